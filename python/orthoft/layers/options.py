"""The adapter options of OFT and BOFT, declared once, and their validation.

``OFTOptions`` and ``BOFTOptions`` are the declaration: each field is one option with its type,
default, PEFT config field and check. The layers' keyword options, ``add_adapter``, the configs'
fields and ``layer_options()`` are all derived from them. Every check names the owner (layer or
config), the argument, the value and what would be valid. Nothing is adjusted: an option that does
not fit the layer is an error.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .._checks import MAX_FACTORS

# The butterfly operator handles at most this many factors (its checks say so).
MAX_BUTTERFLY_FACTORS = MAX_FACTORS

# A check returns the normalised value, or the reason (``"must be ..."``) the value is invalid.
Check = Callable[[Any], "Any | Invalid"]


@dataclass(frozen=True)
class Invalid:
    requirement: str


def integer(minimum: int, maximum: int | None = None) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return Invalid(f"must be an integer >= {minimum}")
        if maximum is not None and value > maximum:
            return Invalid(f"must be at most {maximum}")
        return value

    return check


def boolean(value: Any) -> Any:
    return value if isinstance(value, bool) else Invalid("must be True or False")


def probability(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return Invalid("must be a probability in [0, 1]")
    return float(value)


def positive(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return Invalid("must be a positive number")
    return float(value)


# The series costs one b x b product per term: well before this many terms the exact transform
# (use_cayley_neumann=False) is cheaper and exact, and an absurd count (10**7) stalls every forward.
MAX_CAYLEY_NEUMANN_TERMS = 64


def series_terms(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAYLEY_NEUMANN_TERMS:
        return Invalid(
            f"must be an integer >= 1 and at most {MAX_CAYLEY_NEUMANN_TERMS} (for more accuracy use the "
            "exact Cayley transform, use_cayley_neumann=False)"
        )
    return value


def option(default: Any, check: Check, peft: str | None = None) -> Any:
    """A field of an options dataclass: its default, check and PEFT config field (default: same name)."""
    return dataclasses.field(default=default, metadata={"check": check, "peft": peft})


_Options = TypeVar("_Options", bound="AdapterOptions")
_Function = TypeVar("_Function", bound=Callable[..., Any])


@dataclass(frozen=True)
class Owner:
    """Who reports an invalid option: a layer names it by its keyword (``r``), a config by its PEFT
    field in backticks (`` `oft_block_size` ``)."""

    label: str
    config_of: type[AdapterOptions] | None = None

    def name(self, option_name: str) -> str:
        return option_name if self.config_of is None else f"`{self.config_of.peft_field(option_name)}`"

    def error(self, option_name: str, value: object, requirement: str) -> ValueError:
        end = "" if self.config_of is None else "."
        return ValueError(f"{self.label}: {self.name(option_name)} {requirement}, got {value!r}{end}")


@dataclass(frozen=True)
class AdapterOptions:
    """Base of the options declarations; subclasses add one field per option."""

    # The PEFT ``peft_type`` of the method these options configure.
    peft_type: ClassVar[str]
    # The pair of options of which exactly one is non-zero; the other follows from the rotation size
    # (None: the method sizes its blocks from one option).
    size_pair: ClassVar[tuple[str, str] | None]

    def __str__(self) -> str:
        return ", ".join(f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self))

    @classmethod
    def declared(cls) -> Iterator[tuple[dataclasses.Field[Any], str]]:
        """Every option's field and its PEFT config field name."""
        for field in dataclasses.fields(cls):
            yield field, field.metadata["peft"] or field.name

    @classmethod
    def peft_field(cls, option_name: str) -> str:
        return next(peft for field, peft in cls.declared() if field.name == option_name)

    @classmethod
    def checked(cls: type[_Options], owner: Owner, values: Mapping[str, Any]) -> _Options:
        """Options from ``values`` (option name -> value; missing ones take their defaults), each checked.

        An unknown name is a ``TypeError``.
        """
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise TypeError(
                f"{owner.label}: unknown options {unknown}; {cls.peft_type} options are {sorted(defaults)}"
            )
        checked: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = values.get(field.name, field.default)
            result = field.metadata["check"](value)
            if isinstance(result, Invalid):
                raise owner.error(field.name, value, result.requirement)
            checked[field.name] = result
        if cls.size_pair is None:
            return cls(**checked)
        a, b = cls.size_pair
        if (checked[a] == 0) == (checked[b] == 0):
            if owner.config_of is None:
                raise ValueError(
                    f"{owner.label}: set exactly one of {a} and {b} to a non-zero value; the other follows "
                    f"from the rotation size, which is their product; got {a}={checked[a]}, {b}={checked[b]}"
                )
            pa, pb = cls.peft_field(a), cls.peft_field(b)
            raise ValueError(
                f"{owner.label}: set exactly one of `{pa}` ({checked[a]}) and `{pb}` ({checked[b]}) to a "
                f"non-zero value ({pa} * {pb} == in_features, the other one is derived); e.g. "
                f"{pa}={defaults[a]}, {pb}={defaults[b]}."
            )
        return cls(**checked)

    def check_without_layer(self, owner: Owner) -> None:
        """Rules that need no layer size (a config's); ``resolve`` checks them too, with valid values."""

    def resolve(self: _Options, label: str, dim: int, dim_text: str) -> _Options:
        """These options fitted to a rotation of size ``dim`` (described by ``dim_text``): both options of
        ``size_pair`` set, or a ``ValueError`` naming the nearest valid values."""
        raise NotImplementedError


def keyword_parameters(options_class: type[AdapterOptions]) -> list[inspect.Parameter]:
    """The options as keyword-only parameters, for the signatures of the layers and ``add_adapter``."""
    return [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.type
        )
        for field in dataclasses.fields(options_class)
    ]


def with_options_signature(function: _Function, options_class: type[AdapterOptions]) -> _Function:
    """A copy of ``function`` whose signature shows its ``**options`` as the typed keyword parameters of
    ``options_class`` (for ``help``, ``inspect`` and editors); the options themselves are checked in
    ``AdapterOptions.checked``."""
    copy = types.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__doc__ = function.__qualname__, function.__doc__
    signature = inspect.signature(function)
    kept = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    copy.__signature__ = signature.replace(parameters=[*kept, *keyword_parameters(options_class)])  # type: ignore[attr-defined]
    return copy  # type: ignore[return-value]


def layer_label(class_name: str, layer_name: str | None) -> str:
    """How errors name a layer: its class, and its module path when known."""
    return class_name if layer_name is None else f"{class_name} '{layer_name}'"


def nearest(valid: list[int], target: int, count: int = 4) -> list[int]:
    """The ``count`` values of ``valid`` closest to ``target``, in increasing order."""
    return sorted(sorted(valid, key=lambda v: (abs(v - target), v))[:count])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _invalid(label: str, argument: str, value: object, reason: str, valid: list[int]) -> ValueError:
    hint = (
        f"valid {argument} values near {value}: {', '.join(map(str, valid))}"
        if valid
        else f"no value of {argument} is valid here"
    )
    return ValueError(f"{label}: {argument}={value!r} is invalid: {reason}; {hint}")


@dataclass(frozen=True)
class OFTOptions(AdapterOptions):
    """OFT: ``R = blockdiag(R_1 .. R_r)`` of Cayley rotations. PEFT's ``OFTConfig`` fields, without the
    ``oft_`` prefix; after ``resolve`` both ``r`` and ``block_size`` are set."""

    peft_type: ClassVar[str] = "OFT"
    size_pair: ClassVar[tuple[str, str]] = ("r", "block_size")

    r: int = option(0, integer(0))
    block_size: int = option(32, integer(0), "oft_block_size")
    dropout: float = option(0.0, probability, "module_dropout")
    coft: bool = option(False, boolean)
    eps: float = option(6e-5, positive)
    block_share: bool = option(False, boolean)
    use_cayley_neumann: bool = option(True, boolean)
    num_cayley_neumann_terms: int = option(5, series_terms)
    init_weights: bool = option(True, boolean)

    def check_without_layer(self, owner: Owner) -> None:
        if self.block_size == 1:
            raise owner.error("block_size", 1, "must be >= 2 (a 1 x 1 rotation is fixed)")

    def resolve(self, label: str, dim: int, dim_text: str) -> OFTOptions:
        # A block of size 1 has no free parameter: it could only be the identity.
        valid_sizes = [d for d in divisors(dim) if d >= 2]
        if self.block_size:
            if self.block_size not in valid_sizes:
                reason = f"it must divide {dim_text} and be at least 2"
                raise _invalid(
                    label, "block_size", self.block_size, reason, nearest(valid_sizes, self.block_size)
                )
            return dataclasses.replace(self, r=dim // self.block_size)
        valid_counts = sorted(dim // d for d in valid_sizes)
        if self.r not in valid_counts:
            reason = f"it must divide {dim_text} into blocks of size at least 2"
            raise _invalid(label, "r", self.r, reason, nearest(valid_counts, self.r))
        return dataclasses.replace(self, block_size=dim // self.r)


def valid_boft_block_sizes(dim: int, n_butterfly_factor: int) -> list[int]:
    """Block sizes for which ``n_butterfly_factor`` factors fit a rotation of size ``dim``."""
    m = n_butterfly_factor
    return [d for d in divisors(dim) if d >= 2 and (m == 1 or d % 2 == 0) and dim % (d << (m - 1)) == 0]


@dataclass(frozen=True)
class BOFTOptions(AdapterOptions):
    """BOFT: ``m`` butterfly factors of ``D`` Cayley blocks of size ``b``. PEFT's ``BOFTConfig`` fields,
    without the ``boft_`` prefix; after ``resolve`` both ``block_size`` and ``block_num`` are set."""

    peft_type: ClassVar[str] = "BOFT"
    size_pair: ClassVar[tuple[str, str]] = ("block_size", "block_num")

    block_size: int = option(4, integer(0), "boft_block_size")
    block_num: int = option(0, integer(0), "boft_block_num")
    n_butterfly_factor: int = option(1, integer(1, MAX_BUTTERFLY_FACTORS), "boft_n_butterfly_factor")
    dropout: float = option(0.0, probability, "boft_dropout")
    init_weights: bool = option(True, boolean)

    def check_without_layer(self, owner: Owner) -> None:
        if self.block_size == 1:
            raise owner.error("block_size", 1, "must be >= 2 (a 1 x 1 rotation is fixed)")
        if self.n_butterfly_factor > 1 and self.block_size % 2 == 1:
            size, factors = owner.name("block_size"), owner.name("n_butterfly_factor")
            raise ValueError(
                f"{owner.label}: {size} must be even with {factors} > 1, got {self.block_size}; "
                f"nearest valid: {self.block_size - 1} or {self.block_size + 1}."
            )

    def resolve(self, label: str, dim: int, dim_text: str) -> BOFTOptions:
        m = self.n_butterfly_factor
        valid_sizes = valid_boft_block_sizes(dim, m)
        if self.block_size:
            argument, value, b, valid = "block_size", self.block_size, self.block_size, valid_sizes
        else:
            argument, value = "block_num", self.block_num
            b = dim // self.block_num if dim % self.block_num == 0 else 0
            valid = sorted(dim // d for d in valid_sizes)
        if b not in valid_sizes:
            rule = _boft_rule(dim_text, m)
            if b not in valid_boft_block_sizes(dim, 1):
                raise _invalid(label, argument, value, rule, nearest(valid, value))
            # The blocks split the rotation; it is the number of factors that does not fit them.
            valid_factors = [
                k for k in range(1, MAX_BUTTERFLY_FACTORS + 1) if b in valid_boft_block_sizes(dim, k)
            ]
            alternatives = ", ".join(map(str, nearest(valid, value))) or "none"
            reason = (
                f"{rule}, which block size {b} does not satisfy ({argument} values that do: {alternatives})"
            )
            raise _invalid(label, "n_butterfly_factor", m, reason, nearest(valid_factors, m))
        return dataclasses.replace(self, block_size=b, block_num=dim // b)


def _boft_rule(dim_text: str, m: int) -> str:
    if m == 1:
        return f"the blocks must split {dim_text} evenly, with block size at least 2"
    return (
        f"with n_butterfly_factor={m} the block size b must be even and {dim_text} must be divisible "
        f"by b * 2^(n_butterfly_factor-1) = b * {2 ** (m - 1)}"
    )
