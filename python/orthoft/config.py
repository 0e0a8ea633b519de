"""Adapter configurations: PEFT's ``OFTConfig`` and ``BOFTConfig`` fields, defaults and JSON form.

A PEFT user changes one import. Validation follows PEFT, and is stricter where PEFT silently
ignores or adjusts an option: every invalid value raises a ``ValueError`` that names the field,
the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .layers.options import AdapterOptions, BOFTOptions, Check, Invalid, OFTOptions, Owner, boolean, integer
from .regex_bounds import check_bounded_regex

__all__ = ["ALL_LINEAR", "BOFTConfig", "OFTConfig", "OrthoftConfig"]

# ``target_modules`` shorthand (as PEFT): every Linear / Conv1D layer except the model's output layer.
ALL_LINEAR = "all-linear"

# Fields every PEFT config carries that have no effect on the adapter itself.
_PEFT_ONLY_FIELDS = frozenset(
    {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)


# The tuner matches ``layers_pattern`` inside a regex with two variable repeats of its own.
_REPEATS_AROUND = {"layers_pattern": 2}


def _check(owner: str, name: str, value: object, check: Check) -> None:
    result = check(value)
    if isinstance(result, Invalid):
        raise ValueError(f"{owner}: `{name}` {result.requirement}, got {value!r}.")


def _normalize_names(owner: str, name: str, value: object) -> list[str] | str | None:
    """``None``, a regex string (checked to compile) or a list of module-name suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        check_bounded_regex(owner, name, value, _REPEATS_AROUND.get(name, 0))
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
    options_class: ClassVar[type[AdapterOptions]]
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
    # Raw parameters to adapt (fused MoE expert weights), named as PEFT's LoRA names them: the parameter's
    # path or a suffix of it, e.g. "mlp.experts.gate_up_proj". See ``orthoft.layers.parameter``.
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.target_modules = _normalize_names(owner, "target_modules", self.target_modules)
        if self.target_parameters is not None:
            names = _normalize_names(owner, "target_parameters", self.target_parameters)
            if isinstance(names, str):
                raise ValueError(
                    f"{owner}: `target_parameters` must be a list of parameter names (as in PEFT, no regular "
                    f"expression), e.g. ['mlp.experts.gate_up_proj'], got {names!r}."
                )
            self.target_parameters = names
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
        _check(owner, "fan_in_fan_out", self.fan_in_fan_out, boolean)
        reporter = Owner(owner, config_of=self.options_class)
        self.options_class.checked(reporter, self.layer_options()).check_without_layer(reporter)

    def _check_layers(self, owner: str) -> None:
        layers = self.layers_to_transform
        if isinstance(layers, (list, tuple)):
            for index in layers:
                _check(owner, "layers_to_transform", index, integer(0))
            self.layers_to_transform = list(layers)
        elif layers is not None:
            _check(owner, "layers_to_transform", layers, integer(0))
        pattern = _normalize_names(owner, "layers_pattern", self.layers_pattern)
        for entry in pattern if isinstance(pattern, list) else ():
            check_bounded_regex(owner, "layers_pattern", entry, _REPEATS_AROUND["layers_pattern"])
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
        return {field.name: getattr(self, peft_field) for field, peft_field in self.options_class.declared()}

    def options_for(self, path: str) -> dict[str, Any]:
        """The keyword options of the layer at module path ``path`` (the same for every layer here)."""
        return self.layer_options()

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


def _method_config(name: str, options_class: type[AdapterOptions], adapted_bias_only: str, doc: str) -> Any:
    """The config class of one method: the shared fields, then one field per option of ``options_class``
    under its PEFT name and with its default."""
    shared = {field.name for field in dataclasses.fields(OrthoftConfig)}
    fields = [
        (peft_field, field.type, dataclasses.field(default=field.default))
        for field, peft_field in options_class.declared()
        if peft_field not in shared
    ]
    namespace = {
        "__doc__": doc,
        "__module__": __name__,
        "peft_type": options_class.peft_type,
        "options_class": options_class,
        "adapted_bias_only": adapted_bias_only,
    }
    return dataclasses.make_dataclass(name, fields, bases=(OrthoftConfig,), namespace=namespace)


OFTConfig = _method_config(
    "OFTConfig",
    OFTOptions,
    "oft_only",
    """Orthogonal finetuning with block-diagonal Cayley rotations (PEFT's ``OFTConfig``).

    Exactly one of ``r`` (blocks per layer) and ``oft_block_size`` is non-zero; the other is
    derived per layer from its input size. ``module_dropout`` replaces random blocks by the
    identity in training. ``coft`` / ``eps`` constrain each rotation to an ``eps``-ball around
    the identity. ``block_share`` uses one block for all ``r``. ``use_cayley_neumann`` with
    ``num_cayley_neumann_terms`` terms approximates the Cayley transform by a series. The fields
    and defaults come from ``orthoft.layers.options.OFTOptions``.
    """,
)

BOFTConfig = _method_config(
    "BOFTConfig",
    BOFTOptions,
    "boft_only",
    """Butterfly orthogonal finetuning (PEFT's ``BOFTConfig``).

    Exactly one of ``boft_block_size`` and ``boft_block_num`` is non-zero; the other is derived
    per layer. ``boft_n_butterfly_factor`` is the number of butterfly factors ``m`` (1 is OFT with
    full blocks). ``boft_dropout`` replaces random blocks of one random factor by the identity in
    training. The fields and defaults come from ``orthoft.layers.options.BOFTOptions``.
    """,
)

_CONFIG_CLASSES: dict[str, type[OrthoftConfig]] = {"OFT": OFTConfig, "BOFT": BOFTConfig}
