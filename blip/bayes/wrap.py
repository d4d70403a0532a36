"""Select layers of a backbone by module-name pattern and make them noisy."""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .layers import NoisyLinear
from .noise import NoiseState

# A factory turns (module, domain, slot, state) into its noisy replacement.
Factory = Callable[[nn.Module, str, int, NoiseState], nn.Module]
DEFAULT_FACTORIES: dict[type, Factory] = {nn.Linear: NoisyLinear}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _factory_for(module: nn.Module, factories: dict[type, Factory]) -> Factory | None:
    for cls, factory in factories.items():
        if type(module) is cls:
            return factory
    return None


def wrap(
    backbone: nn.Module,
    patterns: dict[str, str],
    state: NoiseState,
    factories: dict[type, Factory] | None = None,
) -> dict[str, list[str]]:
    """Replace every module whose full name matches a regex in ``patterns`` by a noisy layer.

    patterns: regex (matched against the whole module name) -> domain (e.g. "node", "edge").
    factories: module type -> factory; ``nn.Linear`` -> :class:`NoisyLinear` by default.
    Returns domain -> names of its noisy layers; a layer's slot is its position in that list.
    Raises ValueError if a pattern matches no layer a factory can wrap.
    """
    factories = {**DEFAULT_FACTORIES, **(factories or {})}
    compiled = [(re.compile(p), d) for p, d in patterns.items()]
    layers: dict[str, list[str]] = {}
    matched = {p: 0 for p in patterns}
    for name, module in list(backbone.named_modules()):
        hits = [(rx, d) for rx, d in compiled if rx.fullmatch(name)]
        if not hits:
            continue
        factory = _factory_for(module, factories)
        if factory is None:
            continue
        rx, domain = hits[0]
        matched[rx.pattern] += 1
        slot = len(layers.setdefault(domain, []))
        layers[domain].append(name)
        _set_submodule(backbone, name, factory(module, domain, slot, state))
    missing = [p for p, n in matched.items() if n == 0]
    if missing:
        raise ValueError(f"noisy-layer patterns matched no wrappable layer: {missing}")
    return layers
