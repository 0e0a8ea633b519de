"""Validation of the adapter options of the OFT and BOFT layers.

Every check names the layer, the argument, the value and the nearest valid values. Nothing is
adjusted: an option that does not fit the layer is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# The butterfly operator handles at most this many factors.
MAX_BUTTERFLY_FACTORS = 30


@dataclass(frozen=True)
class OFTOptions:
    """One OFT adapter's options, with ``r`` and ``block_size`` both resolved."""

    r: int
    block_size: int
    dropout: float
    coft: bool
    eps: float
    block_share: bool
    use_cayley_neumann: bool
    num_cayley_neumann_terms: int
    init_weights: bool

    def __str__(self) -> str:
        return options_text(self)


@dataclass(frozen=True)
class BOFTOptions:
    """One BOFT adapter's options, with ``block_size`` and ``block_num`` both resolved."""

    block_size: int
    block_num: int
    n_butterfly_factor: int
    dropout: float
    init_weights: bool

    def __str__(self) -> str:
        return options_text(self)


def options_text(options: OFTOptions | BOFTOptions) -> str:
    """``name=value`` pairs of every option, for ``extra_repr``."""
    return ", ".join(f"{field.name}={getattr(options, field.name)}" for field in fields(options))


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


def _require_int(label: str, argument: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label}: {argument} must be an integer >= {minimum}, got {value!r}")
    return value


def _require_bool(label: str, argument: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{label}: {argument} must be True or False, got {value!r}")
    return value


def _require_probability(label: str, argument: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{label}: {argument} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _require_exactly_one(label: str, names: tuple[str, str], values: tuple[int, int], dim_text: str) -> None:
    if (values[0] == 0) == (values[1] == 0):
        raise ValueError(
            f"{label}: set exactly one of {names[0]} and {names[1]} to a non-zero value; the other follows "
            f"from {dim_text}, which is their product; got {names[0]}={values[0]}, {names[1]}={values[1]}"
        )


def resolve_oft_options(
    label: str,
    dim: int,
    dim_text: str,
    *,
    r: int,
    block_size: int,
    dropout: float,
    coft: bool,
    eps: float,
    block_share: bool,
    use_cayley_neumann: bool,
    num_cayley_neumann_terms: int,
    init_weights: bool,
) -> OFTOptions:
    """Checks OFT options for a rotation of size ``dim`` (described by ``dim_text``)."""
    r = _require_int(label, "r", r, 0)
    block_size = _require_int(label, "block_size", block_size, 0)
    _require_exactly_one(label, ("r", "block_size"), (r, block_size), dim_text)
    # A block of size 1 has no free parameter: it could only be the identity.
    valid_sizes = [d for d in divisors(dim) if d >= 2]
    if block_size:
        if block_size not in valid_sizes:
            reason = f"it must divide {dim_text} and be at least 2"
            raise _invalid(label, "block_size", block_size, reason, nearest(valid_sizes, block_size))
        r = dim // block_size
    else:
        valid_counts = sorted(dim // d for d in valid_sizes)
        if r not in valid_counts:
            reason = f"it must divide {dim_text} into blocks of size at least 2"
            raise _invalid(label, "r", r, reason, nearest(valid_counts, r))
        block_size = dim // r
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{label}: eps must be a positive number, got {eps!r}")
    use_cayley_neumann = _require_bool(label, "use_cayley_neumann", use_cayley_neumann)
    if use_cayley_neumann:
        _require_int(label, "num_cayley_neumann_terms", num_cayley_neumann_terms, 1)
    return OFTOptions(
        r=r,
        block_size=block_size,
        dropout=_require_probability(label, "dropout", dropout),
        coft=_require_bool(label, "coft", coft),
        eps=float(eps),
        block_share=_require_bool(label, "block_share", block_share),
        use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms,
        init_weights=_require_bool(label, "init_weights", init_weights),
    )


def valid_boft_block_sizes(dim: int, n_butterfly_factor: int) -> list[int]:
    """Block sizes for which ``n_butterfly_factor`` factors fit a rotation of size ``dim``."""
    m = n_butterfly_factor
    return [d for d in divisors(dim) if d >= 2 and (m == 1 or d % 2 == 0) and dim % (d << (m - 1)) == 0]


def resolve_boft_options(
    label: str,
    dim: int,
    dim_text: str,
    *,
    block_size: int,
    block_num: int,
    n_butterfly_factor: int,
    dropout: float,
    init_weights: bool,
) -> BOFTOptions:
    """Checks BOFT options for a rotation of size ``dim`` (described by ``dim_text``)."""
    block_size = _require_int(label, "block_size", block_size, 0)
    block_num = _require_int(label, "block_num", block_num, 0)
    m = _require_int(label, "n_butterfly_factor", n_butterfly_factor, 1)
    if m > MAX_BUTTERFLY_FACTORS:
        raise ValueError(
            f"{label}: n_butterfly_factor must be at most {MAX_BUTTERFLY_FACTORS}, got {n_butterfly_factor!r}"
        )
    _require_exactly_one(label, ("block_size", "block_num"), (block_size, block_num), dim_text)
    valid_sizes = valid_boft_block_sizes(dim, m)
    if block_size:
        argument, value, b, valid = "block_size", block_size, block_size, valid_sizes
    else:
        argument, value = "block_num", block_num
        b = dim // block_num if dim % block_num == 0 else 0
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
        reason = f"{rule}, which block size {b} does not satisfy ({argument} values that do: {alternatives})"
        raise _invalid(label, "n_butterfly_factor", m, reason, nearest(valid_factors, m))
    return BOFTOptions(
        block_size=b,
        block_num=dim // b,
        n_butterfly_factor=m,
        dropout=_require_probability(label, "dropout", dropout),
        init_weights=_require_bool(label, "init_weights", init_weights),
    )


def _boft_rule(dim_text: str, m: int) -> str:
    if m == 1:
        return f"the blocks must split {dim_text} evenly, with block size at least 2"
    return (
        f"with n_butterfly_factor={m} the block size b must be even and {dim_text} must be divisible "
        f"by b * 2^(n_butterfly_factor-1) = b * {2 ** (m - 1)}"
    )
