"""Select layers of a backbone by module-name pattern and make them noisy."""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .layers import NoisyLinear, NoisyVectorLinear, VectorLinear
from .noise import NoiseState

# A factory turns (module, domain, slot, state) into its noisy replacement.
Factory = Callable[[nn.Module, str, int, NoiseState], nn.Module]
DEFAULT_FACTORIES: dict[type, Factory] = {nn.Linear: NoisyLinear, VectorLinear: NoisyVectorLinear}


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
    factories: module type -> factory; by default ``nn.Linear`` -> :class:`NoisyLinear` and
    :class:`~blip.bayes.layers.VectorLinear` -> :class:`~blip.bayes.layers.NoisyVectorLinear`.
    Returns domain -> names of its noisy layers; a layer's slot is its position in that list.
    Noisy layers inside one ``nn.Sequential`` (an MLP) share one rate: ``rate_slot`` of every
    layer is the slot of the MLP's first noisy layer (its own slot elsewhere); so do the
    :class:`~blip.bayes.layers.VectorLinear` layers of one parent module (they read the same vectors).
    Raises ValueError if a pattern matches no layer a factory can wrap.
    """
    factories = {**DEFAULT_FACTORIES, **(factories or {})}
    compiled = [(re.compile(p), d) for p, d in patterns.items()]
    layers: dict[str, list[str]] = {}
    matched = {p: 0 for p in patterns}
    first_in_mlp: dict[tuple[str, str], int] = {}  # (domain, parent Sequential) -> slot of its first noisy layer
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
        noisy = factory(module, domain, slot, state)
        parent = name.rpartition(".")[0]
        if isinstance(backbone.get_submodule(parent) if parent else backbone, nn.Sequential):
            noisy.rate_slot = first_in_mlp.setdefault((domain, parent), slot)
        elif type(module) is VectorLinear:  # siblings read the same vectors (PaiNN's U and V)
            noisy.rate_slot = first_in_mlp.setdefault((domain, parent + ".<vectors>"), slot)
        _set_submodule(backbone, name, noisy)
    missing = [p for p, n in matched.items() if n == 0]
    if missing:
        raise ValueError(f"noisy-layer patterns matched no wrappable layer: {missing}")
    return layers


def rate_slots(backbone: nn.Module, layers: dict[str, list[str]]) -> dict[str, dict[int, int]]:
    """Domain -> {slot: slot whose rate it uses}. The noisy layers of one MLP (an ``nn.Sequential``)
    share the rate of its first noisy layer, which the inference net computes from the MLP's input
    (the vector layers of one module: from the first one's input)."""
    return {d: {slot: backbone.get_submodule(n).rate_slot for slot, n in enumerate(names)}
            for d, names in layers.items()}
