"""Adapter configurations: PEFT's ``OFTConfig`` and ``BOFTConfig`` fields, defaults and JSON form.

A PEFT user changes one import. Validation follows PEFT, and is stricter where PEFT silently
ignores or adjusts an option: every invalid value raises a ``ValueError`` that names the field,
the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["ALL_LINEAR", "BOFTConfig", "OFTConfig", "OrthoftConfig"]

# ``target_modules`` shorthand (as PEFT): every Linear / Conv1D layer except the model's output layer.
ALL_LINEAR = "all-linear"

# Fields every PEFT config carries that have no effect on the adapter itself.
_PEFT_ONLY_FIELDS = frozenset(
    {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}.")


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_probability(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: `{name}` must be a probability in [0, 1], got {value!r}.")


def _normalize_names(owner: str, name: str, value: object) -> list[str] | str | None:
    """``None``, a regex string (checked to compile) or a list of module-name suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"{owner}: `{name}` {value!r} is not a valid regular expression: {error}."
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        # Sets (as PEFT stores them) are sorted so that the JSON form is reproducible.
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(
        f"{owner}: `{name}` must be None, a regular expression string or a list of non-empty module names, "
        f"got {value!r}."
    )


@dataclass
class OrthoftConfig:
    """Fields shared by ``OFTConfig`` and ``BOFTConfig`` (PEFT's names and defaults)."""

    peft_type: ClassVar[str]
    # The ``bias`` value that trains only the biases of adapted layers ("oft_only" / "boft_only").
    adapted_bias_only: ClassVar[str]

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.target_modules = _normalize_names(owner, "target_modules", self.target_modules)
        self.exclude_modules = _normalize_names(owner, "exclude_modules", self.exclude_modules)
        self._check_layers(owner)
        valid_bias = ("none", "all", self.adapted_bias_only)
        if self.bias not in valid_bias:
            raise ValueError(f"{owner}: `bias` must be one of {valid_bias}, got {self.bias!r}.")
        if self.modules_to_save is not None:
            names = _normalize_names(owner, "modules_to_save", self.modules_to_save)
            if isinstance(names, str):
                raise ValueError(f"{owner}: `modules_to_save` must be a list of module names, got {names!r}.")
            self.modules_to_save = names
        _check_bool(owner, "fan_in_fan_out", self.fan_in_fan_out)
        _check_bool(owner, "init_weights", self.init_weights)

    def _check_layers(self, owner: str) -> None:
        layers = self.layers_to_transform
        if isinstance(layers, (list, tuple)):
            for index in layers:
                _check_int(owner, "layers_to_transform", index, 0)
            self.layers_to_transform = list(layers)
        elif layers is not None:
            _check_int(owner, "layers_to_transform", layers, 0)
        pattern = _normalize_names(owner, "layers_pattern", self.layers_pattern)
        self.layers_pattern = pattern
        if pattern and self.layers_to_transform is None:
            raise ValueError(
                f"{owner}: `layers_pattern` ({pattern!r}) needs `layers_to_transform` to say which layers."
            )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            # PEFT ignores the layer indices with a regex; a regex can name the layers itself.
            raise ValueError(
                f"{owner}: `layers_to_transform` ({self.layers_to_transform!r}) cannot be combined with "
                f"a regex `target_modules` ({self.target_modules!r}); put the layer indices in the regex "
                "or pass `target_modules` as a list of names."
            )

    def layer_options(self) -> dict[str, Any]:
        """Keyword options of the orthoft layers (PEFT's field names without the prefix)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary, with ``peft_type`` saying which method it configures."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OrthoftConfig:
        """Config from ``to_dict`` output or from a PEFT ``adapter_config.json`` of the same method.

        Called on ``OrthoftConfig`` it picks the class from ``peft_type``. PEFT's bookkeeping fields
        (``task_type``, ``peft_version``, ...) are ignored; any other unknown field is an error.
        """
        peft_type = data.get("peft_type")
        config_cls = _CONFIG_CLASSES.get(str(peft_type)) if cls is OrthoftConfig else cls
        if config_cls is None:
            raise ValueError(f"`peft_type` must be one of {sorted(_CONFIG_CLASSES)}, got {peft_type!r}.")
        if peft_type is not None and peft_type != config_cls.peft_type:
            raise ValueError(
                f"{config_cls.__name__}.from_dict: `peft_type` is {peft_type!r}, "
                f"expected {config_cls.peft_type!r}."
            )
        known = {field.name for field in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known - _PEFT_ONLY_FIELDS - {"peft_type"})
        if unknown:
            raise ValueError(
                f"{config_cls.__name__}.from_dict: unknown fields {unknown}; "
                f"valid fields are {sorted(known)}."
            )
        return config_cls(**{name: value for name, value in data.items() if name in known})

    @classmethod
    def from_peft(cls, peft_config: Any) -> OrthoftConfig:
        """The orthoft config equal to a ``peft.OFTConfig`` / ``peft.BOFTConfig`` (or its ``to_dict()``)."""
        data = peft_config if isinstance(peft_config, Mapping) else peft_config.to_dict()
        data = dict(data)
        # PEFT's ``PeftType`` is a ``str`` enum; keep its plain value.
        data["peft_type"] = getattr(data.get("peft_type"), "value", data.get("peft_type"))
        return cls.from_dict(data)


@dataclass
class OFTConfig(OrthoftConfig):
    """Orthogonal finetuning with block-diagonal Cayley rotations (PEFT's ``OFTConfig``).

    Exactly one of ``r`` (blocks per layer) and ``oft_block_size`` is non-zero; the other is
    derived per layer from its input size. ``module_dropout`` replaces random blocks by the
    identity in training. ``coft`` / ``eps`` constrain each rotation to an ``eps``-ball around
    the identity. ``block_share`` uses one block for all ``r``. ``use_cayley_neumann`` with
    ``num_cayley_neumann_terms`` terms approximates the Cayley transform by a series.
    """

    peft_type: ClassVar[str] = "OFT"
    adapted_bias_only: ClassVar[str] = "oft_only"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _check_int(owner, "r", self.r, 0)
        _check_int(owner, "oft_block_size", self.oft_block_size, 0)
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"{owner}: set exactly one of `r` ({self.r}) and `oft_block_size` ({self.oft_block_size}) "
                "to a non-zero value (r * oft_block_size == in_features, the other one is derived); "
                "e.g. r=0, oft_block_size=32."
            )
        if self.oft_block_size == 1:
            raise ValueError(f"{owner}: `oft_block_size` must be >= 2 (a 1 x 1 rotation is fixed), got 1.")
        _check_probability(owner, "module_dropout", self.module_dropout)
        _check_bool(owner, "coft", self.coft)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"{owner}: `eps` must be a positive number, got {self.eps!r}.")
        _check_bool(owner, "block_share", self.block_share)
        _check_bool(owner, "use_cayley_neumann", self.use_cayley_neumann)
        _check_int(owner, "num_cayley_neumann_terms", self.num_cayley_neumann_terms, 1)

    def layer_options(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "block_size": self.oft_block_size,
            "dropout": float(self.module_dropout),
            "coft": self.coft,
            "eps": float(self.eps),
            "block_share": self.block_share,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "init_weights": self.init_weights,
        }


@dataclass
class BOFTConfig(OrthoftConfig):
    """Butterfly orthogonal finetuning (PEFT's ``BOFTConfig``).

    Exactly one of ``boft_block_size`` and ``boft_block_num`` is non-zero; the other is derived
    per layer. ``boft_n_butterfly_factor`` is the number of butterfly factors ``m`` (1 is OFT with
    full blocks). ``boft_dropout`` replaces random blocks of one random factor by the identity in
    training.
    """

    peft_type: ClassVar[str] = "BOFT"
    adapted_bias_only: ClassVar[str] = "boft_only"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _check_int(owner, "boft_block_size", self.boft_block_size, 0)
        _check_int(owner, "boft_block_num", self.boft_block_num, 0)
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"{owner}: set exactly one of `boft_block_size` ({self.boft_block_size}) and "
                f"`boft_block_num` ({self.boft_block_num}) to a non-zero value (boft_block_size * "
                "boft_block_num == in_features, the other one is derived); e.g. boft_block_size=4, "
                "boft_block_num=0."
            )
        if self.boft_block_size == 1:
            raise ValueError(f"{owner}: `boft_block_size` must be >= 2 (a 1 x 1 rotation is fixed), got 1.")
        _check_int(owner, "boft_n_butterfly_factor", self.boft_n_butterfly_factor, 1)
        if self.boft_n_butterfly_factor > 1 and self.boft_block_size % 2 == 1:
            raise ValueError(
                f"{owner}: `boft_block_size` must be even with boft_n_butterfly_factor > 1, got "
                f"{self.boft_block_size}; nearest valid: {self.boft_block_size - 1} or "
                f"{self.boft_block_size + 1}."
            )
        _check_probability(owner, "boft_dropout", self.boft_dropout)

    def layer_options(self) -> dict[str, Any]:
        return {
            "block_size": self.boft_block_size,
            "block_num": self.boft_block_num,
            "n_butterfly_factor": self.boft_n_butterfly_factor,
            "dropout": float(self.boft_dropout),
            "init_weights": self.init_weights,
        }


_CONFIG_CLASSES: dict[str, type[OrthoftConfig]] = {"OFT": OFTConfig, "BOFT": BOFTConfig}
