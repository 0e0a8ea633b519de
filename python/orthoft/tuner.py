"""Adapting a whole model in place: wrap matching layers with orthoft layers, switch, merge, unload.

``get_orthoft_model(model, config, adapter_name)`` replaces the ``nn.Linear``, ``nn.Conv2d`` and
transformers ``Conv1D`` modules that ``config`` targets by orthoft layers sharing their weights,
and returns the same (mutated) model. The model then carries its adapter configs and active
adapters; the functions here read and change them.

Semantics, following PEFT where it is silent:

- The first adapter of a model is active; adapters added later are inactive until ``set_adapter``.
- Trainable are exactly: the active adapters' tensors, the biases their ``bias`` option names
  ("all": every bias of the model; "oft_only"/"boft_only": the adapted layers' biases; these are
  the base model's own biases, trained in place), and their ``modules_to_save`` copies.
- ``modules_to_save`` modules are wrapped in ``ModulesToSaveWrapper``: a trainable deep copy per
  adapter, the original kept frozen for the base model, ``disable_adapters`` and ``unload``.
- ``merge_and_unload`` / ``unload`` give back the plain model, with its parameters' original
  ``requires_grad`` flags.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, OrthoftConfig
from .default_targets import DEFAULT_TARGET_MODULES
from .layers import LAYER_CLASSES, OrthoftLayer
from .layers.base import active_after_deletion, check_adapter_name
from .layers.kinds import kind_of, supported_kinds
from .modules_to_save import ModulesToSaveWrapper
from .parameter_targets import (
    ParameterTarget,
    add_parameter_adapters,
    check_same_parameters,
    find_parameter_targets,
)

__all__ = [
    "ModulesToSaveWrapper",
    "active_adapters",
    "adapter_configs",
    "delete_adapter",
    "disable_adapters",
    "get_nb_trainable_parameters",
    "get_orthoft_model",
    "layer_adapter_names",
    "merge_and_unload",
    "named_modules_to_save",
    "named_orthoft_layers",
    "print_trainable_parameters",
    "set_adapter",
    "unload",
]

_STATE_ATTRIBUTE = "_orthoft_state"


@dataclass
class _AdapterState:
    """What a model adapted by orthoft carries: its adapters and what to restore on unload."""

    configs: dict[str, OrthoftConfig]
    active: list[str]
    # ``requires_grad`` of every parameter before the first adapter, by parameter name.
    base_requires_grad: dict[str, bool]


# ---------------------------------------------------------------------------------------------
# Inspection


def _state(model: nn.Module) -> _AdapterState:
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no orthoft adapters; add one with "
            "orthoft.get_orthoft_model(model, config)."
        )
    return state


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(path, module, parent, attribute)`` of every submodule at every path, not entering orthoft
    layers and modules_to_save wrappers (their insides are not the model's own modules)."""

    def walk(parent: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
        for attribute, child in parent._modules.items():
            if child is None:
                continue
            path = f"{prefix}.{attribute}" if prefix else attribute
            yield path, child, parent, attribute
            if not isinstance(child, (OrthoftLayer, ModulesToSaveWrapper)):
                yield from walk(child, path)

    return walk(model, "")


def _layer_chain(layer: OrthoftLayer) -> list[OrthoftLayer]:
    """``layer`` and the orthoft layers nested inside it (the adapters of several parameters of one module
    nest, as PEFT's do); the last one's ``base_layer`` is the model's own module."""
    chain = [layer]
    while isinstance(chain[-1].base_layer, OrthoftLayer):
        chain.append(chain[-1].base_layer)
    return chain


def named_orthoft_layers(model: nn.Module) -> list[tuple[str, OrthoftLayer]]:
    """``(path, layer)`` of every orthoft layer in ``model``, each layer once."""
    return [(path, module) for path, module in model.named_modules() if isinstance(module, OrthoftLayer)]


def named_modules_to_save(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    """``(path, wrapper)`` of every ``ModulesToSaveWrapper`` in ``model``, each once."""
    return [
        (path, module) for path, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)
    ]


def layer_adapter_names(layer: OrthoftLayer) -> list[str]:
    """Names of the adapters an orthoft layer holds, in the order they were added."""
    return layer.adapter_names


def adapter_configs(model: nn.Module) -> dict[str, OrthoftConfig]:
    """Adapter name -> config of every adapter added to ``model`` (a copy)."""
    return dict(_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that ``model`` applies, in order of application."""
    return list(_state(model).active)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements, each shared parameter counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the numbers of trainable and of all parameter elements, as PEFT does."""
    trainable, total = get_nb_trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


# ---------------------------------------------------------------------------------------------
# Matching


def _is_linear(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.family == "linear"


def _matches_names(names: Sequence[str] | str, path: str) -> bool:
    """A regex string must match the whole path; a list entry must equal the path or end it."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in names)


def _layer_index(path: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """Index of the layer stack entry that ``path`` lies in: the first index after a named module.

    As PEFT, except that without ``layers_pattern`` a stack at the top of the model counts too
    (PEFT needs a module above it: ``model.layers.1.q`` but not ``layers.1.q``).
    """
    if not layers_pattern:
        match = re.match(r"(?:.*?\.)?[^.]+\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def _in_modules_to_save(config: OrthoftConfig, path: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", path) for name in config.modules_to_save or ())


def _is_target(config: OrthoftConfig, path: str, module: nn.Module, output_layer: nn.Module | None) -> bool:
    if config.exclude_modules is not None and _matches_names(config.exclude_modules, path):
        return False
    if _in_modules_to_save(config, path):
        return False
    targets = config.target_modules
    if targets == ALL_LINEAR:
        base = module.base_layer if isinstance(module, OrthoftLayer) else module
        return _is_linear(base) and base is not output_layer
    if targets is None or not _matches_names(targets, path):
        return False
    return isinstance(targets, str) or _in_layers(config, path)


def _in_layers(config: OrthoftConfig, path: str) -> bool:
    """Whether ``path`` lies in one of ``layers_to_transform`` (any path when it is None)."""
    layers = config.layers_to_transform
    if layers is None:
        return True
    index = _layer_index(path, config.layers_pattern)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _module_selected(config: OrthoftConfig, path: str) -> bool:
    """Whether exclude_modules, layers_to_transform and modules_to_save leave the module at ``path`` to adapt
    (for the modules holding ``target_parameters``)."""
    excluded = config.exclude_modules is not None and _matches_names(config.exclude_modules, path)
    return not excluded and not _in_modules_to_save(config, path) and _in_layers(config, path)


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output projection (transformers' ``get_output_embeddings``), if it names one."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    return get_output_embeddings() if callable(get_output_embeddings) else None


def _describe(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _no_match_error(model: nn.Module, config: OrthoftConfig) -> ValueError:
    paths = [path for path, module, _, _ in _walk(model) if kind_of(module) is not None]
    kind = f"adaptable ({supported_kinds()})"
    if not paths:
        paths = [path for path, *_ in _walk(model)]
        kind = "existing"
    shown = ", ".join(repr(path) for path in paths[:20]) + (
        f", ... ({len(paths)} in all)" if len(paths) > 20 else ""
    )
    return ValueError(
        f"target_modules={config.target_modules!r} (layers_to_transform={config.layers_to_transform!r}, "
        f"exclude_modules={config.exclude_modules!r}) matches no module of {type(model).__name__}; "
        f"{kind} modules are: {shown or 'none'}."
    )


def _layer_class(config: OrthoftConfig, path: str, module: nn.Module) -> type[OrthoftLayer]:
    kind = kind_of(module)
    for layer_cls in LAYER_CLASSES:
        if (
            kind is not None
            and layer_cls.family == kind.family
            and layer_cls.options_class is config.options_class
        ):
            return layer_cls
    raise TypeError(
        f"Module '{path}' ({_describe(module)}) matches target_modules={config.target_modules!r} but orthoft "
        f"cannot adapt it with {config.peft_type}: supported are {supported_kinds()}. "
        "Narrow target_modules or add it to exclude_modules."
    )


# ---------------------------------------------------------------------------------------------
# Adding adapters


def _check_no_collision(
    targets: list[tuple[str, nn.Module, nn.Module, str]], parameter_targets: list[ParameterTarget]
) -> None:
    # As PEFT: a module is adapted as a layer or through its parameters, not both.
    both = sorted({path for path, *_ in targets} & {target.path for target in parameter_targets})
    if both:
        raise ValueError(
            f"Modules {both} match target_modules and hold parameters that match target_parameters; adapt "
            "each module one way: remove it from one of them."
        )


def _check_adapter_name(model: nn.Module, adapter_name: object) -> None:
    check_adapter_name(type(model).__name__, adapter_name)
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None and adapter_name in state.configs:
        raise ValueError(
            f"{type(model).__name__} already has an adapter named {adapter_name!r} (adapters: "
            f"{list(state.configs)}); choose another name or delete_adapter it first."
        )


def _check_existing_layer(config: OrthoftConfig, path: str, layer: OrthoftLayer) -> None:
    if layer.options_class is not config.options_class:
        raise ValueError(
            f"Module '{path}' is a {type(layer).__name__} with adapters {layer.adapter_names}; "
            f"a {config.peft_type} adapter cannot be added to it. Exclude it with exclude_modules."
        )


def _warn_on_layout_mismatch(config: OrthoftConfig, targets: list[tuple[str, nn.Module]]) -> None:
    # The weight layout is a property of the module type; a config that says otherwise is wrong.
    disagreeing = [
        path
        for path, module in targets
        if not isinstance(module, OrthoftLayer)
        and _is_linear(module)
        and kind_of(module).fan_in_fan_out != config.fan_in_fan_out  # type: ignore[union-attr]
    ]
    if disagreeing:
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} in the config, but {disagreeing} store their weight as "
            f"{'(out, in) (nn.Linear)' if config.fan_in_fan_out else '(in, out) (Conv1D)'}; "
            "each module's own layout is used.",
            stacklevel=3,
        )


def _find_modules_to_save(model: nn.Module, config: OrthoftConfig) -> list[tuple[nn.Module, nn.Module, str]]:
    """``(module, parent, attribute)`` of every module that ``config.modules_to_save`` names."""
    found: list[tuple[nn.Module, nn.Module, str]] = []
    used: set[str] = set()
    for path, module, parent, attribute in _walk(model):
        name = next((n for n in config.modules_to_save or () if _matches_names([n], path)), None)
        if name is None:
            continue
        used.add(name)
        if any(isinstance(inner, OrthoftLayer) for inner in module.modules()):
            raise ValueError(
                f"Module '{path}' in modules_to_save={config.modules_to_save!r} is or holds an "
                "orthoft-adapted layer."
            )
        found.append((module, parent, attribute))
    missing = sorted(set(config.modules_to_save or ()) - used)
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}.")
    return found


def _wrap_modules_to_save(
    found: list[tuple[nn.Module, nn.Module, str]], adapter_name: str
) -> list[tuple[nn.Module, str, ModulesToSaveWrapper]]:
    """``(parent, attribute, wrapper)`` to install, each wrapper holding a new copy for ``adapter_name``."""
    installs: list[tuple[nn.Module, str, ModulesToSaveWrapper]] = []
    wrappers: dict[int, ModulesToSaveWrapper] = {}
    for module, parent, attribute in found:
        if id(module) not in wrappers:
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            wrapper.add_copy(adapter_name)
            wrappers[id(module)] = wrapper
        installs.append((parent, attribute, wrappers[id(module)]))
    return installs


def _with_default_targets(model: nn.Module, config: OrthoftConfig) -> OrthoftConfig:
    """``config`` with ``target_modules=None`` replaced by the defaults for the model's type, as PEFT."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES and config.target_parameters:
        # As PEFT: parameters alone are a complete target.
        return dataclasses.replace(config, target_modules=[])
    if model_type not in DEFAULT_TARGET_MODULES:
        known = "" if model_type is None else f" for its model type {model_type!r}"
        raise ValueError(
            f"{type(config).__name__}.target_modules is None and {type(model).__name__} has no default "
            f"targets{known}: name the modules to adapt (a list of name suffixes, a regular expression "
            f"matching whole paths, or {ALL_LINEAR!r})."
        )
    return dataclasses.replace(config, target_modules=copy.copy(DEFAULT_TARGET_MODULES[model_type]))


def get_orthoft_model(
    model: nn.Module, config: OrthoftConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Add the adapter ``adapter_name`` described by ``config`` to ``model``, in place; returns ``model``.

    Matching modules are replaced by orthoft layers sharing their parameters (layers already
    wrapped get the adapter added). Everything but the active adapters' tensors, the biases that
    ``config.bias`` names and the ``modules_to_save`` copies is frozen. On any error the model is
    left as it was. ``target_modules=None`` takes PEFT's defaults for the model's transformers type.
    With ``low_cpu_mem_usage`` the adapter tensors are created on the meta device, to be loaded
    (``load_adapter``) before use.
    """
    if not isinstance(config, OrthoftConfig) or type(config) is OrthoftConfig:
        raise TypeError(f"config must be an orthoft OFTConfig or BOFTConfig, got {_describe(config)}.")
    _check_adapter_name(model, adapter_name)
    config = _with_default_targets(model, config)
    output_layer = _output_layer(model) if config.target_modules == ALL_LINEAR else None
    targets: list[tuple[str, nn.Module, nn.Module, str]] = []
    for path, module, parent, attribute in _walk(model):
        if _is_target(config, path, module, output_layer):
            if isinstance(module, OrthoftLayer):
                _check_existing_layer(config, path, module)
            else:
                _layer_class(config, path, module)
            targets.append((path, module, parent, attribute))
    state = model.__dict__.get(_STATE_ATTRIBUTE)
    parameter_targets: list[ParameterTarget] = []
    if config.target_parameters:
        check_same_parameters(config, state.configs if state is not None else {})
        model_name = type(model).__name__
        parameter_targets = find_parameter_targets(_walk(model), config, _module_selected, model_name)
        _check_no_collision(targets, parameter_targets)
    if not targets and (config.target_modules or not parameter_targets):
        raise _no_match_error(model, config)
    _warn_on_layout_mismatch(config, [(path, module) for path, module, _, _ in targets])
    to_save = _find_modules_to_save(model, config)

    if state is None:
        state = _AdapterState({}, [], {name: p.requires_grad for name, p in model.named_parameters()})
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    extended: list[OrthoftLayer] = []
    replacements: dict[int, nn.Module] = {}
    try:
        for path, module, _, _ in targets:
            if isinstance(module, OrthoftLayer):
                if module not in extended:
                    module.add_adapter(
                        adapter_name,
                        layer_name=path,
                        low_cpu_mem_usage=low_cpu_mem_usage,
                        **config.options_for(path),
                    )
                    extended.append(module)
            elif id(module) not in replacements:
                layer_cls = _layer_class(config, path, module)
                replacements[id(module)] = layer_cls.from_module(
                    module,
                    adapter_name=adapter_name,
                    layer_name=path,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    **config.options_for(path),
                )
        parameter_installs = add_parameter_adapters(
            parameter_targets, config, adapter_name, low_cpu_mem_usage
        )
    except BaseException:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise

    installs = _wrap_modules_to_save(to_save, adapter_name)
    for _, module, parent, attribute in targets:
        if id(module) in replacements:
            setattr(parent, attribute, replacements[id(module)])
    for parent, attribute, wrapper in installs:
        setattr(parent, attribute, wrapper)
    for parent, attribute, layer in parameter_installs:
        setattr(parent, attribute, layer)
    # A copy: the config object may be reused and changed for the next adapter.
    state.configs[adapter_name] = copy.deepcopy(config)
    if not state.active:
        state.active = [adapter_name]
    setattr(model, _STATE_ATTRIBUTE, state)
    _apply_active(model, state)
    return model


# ---------------------------------------------------------------------------------------------
# Switching adapters


def _activate_layer(layer: OrthoftLayer, names: Sequence[str]) -> None:
    layer.set_adapter([name for name in names if name in layer.adapter_names])


def _mark_trainable(model: nn.Module, state: _AdapterState) -> None:
    """Freezes the base model, then lets each layer make its active adapters trainable."""
    model.requires_grad_(False)
    active_configs = [state.configs[name] for name in state.active]
    train_all_biases = any(config.bias == "all" for config in active_configs)
    for _, layer in named_orthoft_layers(model):
        _activate_layer(layer, state.active)
        held = [name for name in state.active if name in layer.adapter_names]
        bias = getattr(layer.base_layer, "bias", None)
        trains_bias = any(state.configs[name].bias == state.configs[name].adapted_bias_only for name in held)
        if isinstance(bias, nn.Parameter) and (trains_bias or train_all_biases):
            bias.requires_grad_(True)
    if train_all_biases:
        for _, module, _, _ in _walk(model):
            bias = module._parameters.get("bias")
            if bias is not None:
                bias.requires_grad_(True)
    for _, wrapper in named_modules_to_save(model):
        if wrapper.active_adapter is not None:
            wrapper.modules_to_save[wrapper.active_adapter].requires_grad_(True)


def _apply_active(model: nn.Module, state: _AdapterState) -> None:
    """Make every layer and wrapper apply ``state.active`` and set what is trainable accordingly."""
    for path, wrapper in named_modules_to_save(model):
        holders = [name for name in state.active if name in wrapper.modules_to_save]
        if len(holders) > 1:
            raise ValueError(
                f"Adapters {holders} each have their own copy of '{path}' (modules_to_save); only one "
                "of them can be active."
            )
    for _, wrapper in named_modules_to_save(model):
        wrapper.active_adapter = next(
            (name for name in state.active if name in wrapper.modules_to_save), None
        )
    _mark_trainable(model, state)


def _check_names(state: _AdapterState, names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in state.configs]
    if unknown:
        raise ValueError(f"Unknown adapters {unknown}; the model has {list(state.configs)}.")


def set_adapter(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Apply ``adapter_names`` (one or several, composed in order: ``R = R_last @ ... @ R_first``).

    The active adapters become trainable, the others frozen. Merged layers are unmerged (with a
    warning, as PEFT does): their weights hold the adapters merged before.
    """
    state = _state(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not names:
        raise ValueError(
            "set_adapter needs at least one adapter name; use disable_adapters for the base model."
        )
    _check_names(state, names)
    previous = state.active
    state.active = names
    try:
        _apply_active(model, state)
    except ValueError:
        state.active = previous
        raise
    merged = [(path, layer) for path, layer in named_orthoft_layers(model) if layer.merged]
    if merged:
        warnings.warn(
            f"set_adapter: unmerging the merged layers {[path for path, _ in merged]}.", stacklevel=2
        )
        for _, layer in merged:
            layer.unmerge()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from ``model``.

    Layers left without adapters become their base modules again. If it was active, the other
    active adapters stay active, or else the first added of the remaining adapters becomes active
    (with a warning), as in each layer. Deleting the last adapter gives back the plain model (as
    ``unload``).
    """
    state = _state(model)
    _check_names(state, [adapter_name])
    if list(state.configs) == [adapter_name]:
        unload(model)
        return
    remaining = [name for name in state.configs if name != adapter_name]
    state.active = active_after_deletion(type(model).__name__, state.active, adapter_name, remaining)
    for _, module, parent, attribute in list(_walk(model)):
        if isinstance(module, OrthoftLayer):
            chain = _layer_chain(module)
            if not any(adapter_name in layer.adapter_names for layer in chain):
                continue
            kept = []
            for layer in chain:
                if adapter_name in layer.adapter_names:
                    if adapter_name in layer.merged_adapters:
                        layer.unmerge()
                    if layer.adapter_names == [adapter_name]:
                        continue
                    _activate_layer(layer, state.active)
                    layer.delete_adapter(adapter_name)
                kept.append(layer)
            base = chain[-1].base_layer
            for layer, inner in zip(kept, [*kept[1:], base], strict=False):
                if layer.base_layer is not inner:
                    layer.base_layer = inner
            setattr(parent, attribute, kept[0] if kept else base)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            if module.active_adapter == adapter_name:
                module.active_adapter = None
            del module.modules_to_save[adapter_name]
            if not module.modules_to_save:
                setattr(parent, attribute, module.original_module)
    del state.configs[adapter_name]
    _apply_active(model, state)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` computes as its base model; adapters (and trainability) restored after."""
    _state(model)
    layers = [layer for _, layer in named_orthoft_layers(model)]
    wrappers = [wrapper for _, wrapper in named_modules_to_save(model)]
    layer_flags = [layer.disable_adapters for layer in layers]
    wrapper_flags = [wrapper.adapters_enabled for wrapper in wrappers]
    grad_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        for wrapper in wrappers:
            wrapper.adapters_enabled = False
        yield model
    finally:
        for layer, was_disabled in zip(layers, layer_flags, strict=True):
            layer.enable_adapters(not was_disabled)
        for wrapper, was_enabled in zip(wrappers, wrapper_flags, strict=True):
            wrapper.adapters_enabled = was_enabled
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# Leaving orthoft


def _restore_base(model: nn.Module, state: _AdapterState) -> None:
    delattr(model, _STATE_ATTRIBUTE)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state.base_requires_grad.get(name, parameter.requires_grad))


def merge_and_unload(
    model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
) -> nn.Module:
    """Merge adapters into the base weights and return ``model`` with its plain modules back.

    ``adapter_names=None`` merges the active adapters. ``modules_to_save`` modules become the
    copy of the first of those adapters that has one. ``safe_merge`` checks the merged weights
    for non-finite values before writing them.
    """
    state = _state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_names(state, names)
    _check_weights_not_shared(model)
    # Before changing anything: a forward-only (quantized) layer cannot take a merge.
    for _, layer in named_orthoft_layers(model):
        if any(name in layer.adapter_names for name in names):
            layer.check_mergeable()
    merged: set[int] = set()
    for _, module, parent, attribute in list(_walk(model)):
        if isinstance(module, OrthoftLayer):
            chain = _layer_chain(module)
            if id(module) not in merged:
                for layer in chain:
                    present = [name for name in names if name in layer.adapter_names]
                    if present:
                        layer.merge(safe_merge=safe_merge, adapter_names=present)
                merged.add(id(module))
            setattr(parent, attribute, chain[-1].base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            chosen = next((name for name in names if name in module.modules_to_save), None)
            setattr(
                parent,
                attribute,
                module.original_module if chosen is None else module.modules_to_save[chosen],
            )
    _restore_base(model, state)
    return model


def _check_weights_not_shared(model: nn.Module) -> None:
    """Merging writes into the base weight: refuse where another module shares it (tied or replicated
    layers), whose output would change too, as PEFT refuses to merge into replicated layers. One
    orthoft layer reached at several paths is fine: every path sees the same merged layer."""
    paths: dict[int, list[str]] = {}  # parameter or orthoft layer -> every path it is reached at
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, OrthoftLayer):
            paths.setdefault(id(module), []).append(path)
        for name, parameter in module.named_parameters(recurse=False):
            paths.setdefault(id(parameter), []).append(f"{path}.{name}")
    for layer_path, layer in named_orthoft_layers(model):
        for name, parameter in layer.base_layer.named_parameters():
            own = {f"{path}.base_layer.{name}" for path in paths[id(layer)]}
            others = [path for path in paths[id(parameter)] if path not in own]
            if others:
                raise ValueError(
                    f"Cannot merge into '{layer_path}': its base {name} is shared with {others} (tied or "
                    "replicated layers), which merging would change too. Keep the adapter unmerged or untie."
                )


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter (unmerging merged ones) and return ``model`` as it was before orthoft."""
    state = _state(model)
    for _, module, parent, attribute in list(_walk(model)):
        if isinstance(module, OrthoftLayer):
            chain = _layer_chain(module)
            for layer in chain:
                if layer.merged:
                    layer.unmerge()
            setattr(parent, attribute, chain[-1].base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            setattr(parent, attribute, module.original_module)
    _restore_base(model, state)
    return model
