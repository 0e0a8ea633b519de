"""``target_parameters``: finding the raw parameters a config names and wrapping them, as PEFT's LoRA does.

Matching is PEFT's: an entry names a parameter by its full path or a suffix of it that starts at a
name boundary (``"mlp.experts.gate_up_proj"`` matches ``model.layers.0.mlp.experts.gate_up_proj``);
the parameter is one the module at that path holds itself. ``exclude_modules``, ``layers_to_transform``
and ``modules_to_save`` apply to that module's path as for ``target_modules``. Every entry must match at
least one 2-D or 3-D floating parameter; otherwise a ``ValueError`` names it and lists the valid ones,
before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .config import OrthoftConfig
from .layers.base import OrthoftLayer
from .layers.parameter import PARAMETER_LAYER_CLASSES, ParameterLayer, parameter_holder, parameter_problem

__all__ = ["ParameterTarget", "add_parameter_adapters", "check_same_parameters", "find_parameter_targets"]

# (path, module, parent, attribute) of every module, as the tuner walks the model.
Walked = Iterable[tuple[str, nn.Module, nn.Module, str]]


@dataclass(frozen=True)
class ParameterTarget:
    path: str  # the holding module's path in the model
    parameter_name: str
    parent: nn.Module
    attribute: str


def _matches(entries: list[str], key: str) -> list[str]:
    return [entry for entry in entries if key == entry or key.endswith(f".{entry}")]


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:20])
    return (shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")) or "none"


def find_parameter_targets(
    walked: Walked,
    config: OrthoftConfig,
    module_selected: Callable[[OrthoftConfig, str], bool],
    model_name: str,
) -> list[ParameterTarget]:
    """The parameters ``config.target_parameters`` names, in model order (each module's parameters in the
    order it registered them). ``module_selected(config, path)`` applies exclude_modules, layers and
    modules_to_save to a module's path."""
    walked = list(walked)
    entries = list(config.target_parameters or ())
    found: list[ParameterTarget] = []
    used: set[str] = set()
    adaptable: list[str] = []
    for path, module, parent, attribute in walked:
        if isinstance(module, OrthoftLayer) and not isinstance(module, ParameterLayer):
            continue
        holder = parameter_holder(module)
        for name, parameter in holder._parameters.items():
            if parameter is None:
                continue
            key = f"{path}.{name}"
            problem = parameter_problem(parameter)
            if problem is None:
                adaptable.append(key)
            matched = _matches(entries, key)
            if not matched or not module_selected(config, path):
                continue
            if problem is not None:
                raise ValueError(
                    f"target_parameters entry {matched[0]!r} matches '{key}' of shape "
                    f"{tuple(parameter.shape)} ({parameter.dtype}), which cannot be adapted: {problem}. "
                    "Adaptable parameters: "
                    f"{_listed(adaptable_of(walked, problem_free=True))}."
                )
            used.update(matched)
            found.append(ParameterTarget(path, name, parent, attribute))
    missing = [entry for entry in entries if entry not in used]
    if missing:
        raise ValueError(
            f"target_parameters entries {missing} match no parameter of {model_name} (with exclude_modules="
            f"{config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}); "
            f"adaptable parameters (2-D or 3-D floating, named by path or a suffix of it) are: "
            f"{_listed(adaptable)}."
        )
    return found


def adaptable_of(walked: Walked, problem_free: bool) -> list[str]:
    """Paths of the parameters that could be targeted."""
    return [
        f"{path}.{name}"
        for path, module, _, _ in walked
        if not (isinstance(module, OrthoftLayer) and not isinstance(module, ParameterLayer))
        for name, parameter in parameter_holder(module)._parameters.items()
        if parameter is not None and (parameter_problem(parameter) is None) == problem_free
    ]


def check_same_parameters(config: OrthoftConfig, others: dict[str, OrthoftConfig]) -> None:
    """As PEFT: adapters on parameters must all name the same ones, since a parameter adapter's place in
    the nesting (and so its saved keys) depends on which parameters of its module are wrapped."""
    mine = set(config.target_parameters or ())
    for name, other in others.items():
        theirs = set(other.target_parameters or ())
        if mine and theirs and mine != theirs:
            raise ValueError(
                f"target_parameters={sorted(mine)} differs from adapter {name!r}'s {sorted(theirs)}: "
                "adapters on parameters must all target the same parameters (as in PEFT)."
            )


def _chain_layer(module: nn.Module, parameter_name: str) -> ParameterLayer | None:
    while isinstance(module, ParameterLayer):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def add_parameter_adapters(
    targets: list[ParameterTarget],
    config: OrthoftConfig,
    adapter_name: str,
    low_cpu_mem_usage: bool,
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Adds ``adapter_name`` to every target; returns ``(parent, attribute, wrapper)`` to install.

    Parameters already wrapped get the adapter added; new wrappers nest around the module. On an
    error the adapters added so far are removed and nothing is installed.
    """
    if not targets:  # also for methods without parameter adapters (LyCORIS's)
        return []
    layer_cls = PARAMETER_LAYER_CLASSES[config.peft_type]
    options = config.layer_options()
    current: dict[tuple[int, str], nn.Module] = {}
    places: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    extended: list[ParameterLayer] = []
    try:
        for target in targets:
            place = (id(target.parent), target.attribute)
            module = current.setdefault(place, getattr(target.parent, target.attribute))
            places[place] = (target.parent, target.attribute)
            label = f"{target.path}.{target.parameter_name}"
            existing = _chain_layer(module, target.parameter_name)
            if existing is not None:
                if existing.options_class is not config.options_class:
                    raise ValueError(
                        f"Parameter '{label}' holds {existing.options_class.peft_type} adapters "
                        f"{existing.adapter_names}; a {config.peft_type} adapter cannot be added to it."
                    )
                if existing not in extended:
                    existing.add_adapter(
                        adapter_name, layer_name=label, low_cpu_mem_usage=low_cpu_mem_usage, **options
                    )
                    extended.append(existing)
                continue
            current[place] = layer_cls.from_parameter(
                module,
                target.parameter_name,
                adapter_name=adapter_name,
                layer_name=label,
                low_cpu_mem_usage=low_cpu_mem_usage,
                **options,
            )
    except BaseException:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        raise
    return [
        (*places[place], module)
        for place, module in current.items()
        if module is not getattr(places[place][0], places[place][1])
    ]
