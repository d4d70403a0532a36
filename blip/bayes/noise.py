"""Noise context: where the noise rates and the random numbers of one forward pass live.

A forward pass of a wrapped backbone runs inside a :class:`NoiseContext`. Every
noisy layer asks it for its rate (computed on demand from the layer's input) and for
standard-normal draws.
Random numbers are drawn block-wise, one generator per graph of the batch, seeded
from ``(seed, replica, structure_index)``: a Monte-Carlo sample therefore does not
depend on which other structures or replicas share the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


def graph_seed(seed: int, replica: int, structure_index: int) -> int:
    """Seed of the generator for one (sample, structure) block; a 63-bit integer."""
    state = np.random.SeedSequence([int(seed), int(replica), int(structure_index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generators(seed: int, replicas: torch.Tensor, structure_index: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per graph of a (replicated) batch; shapes (G,) and (G,)."""
    gens = []
    for k, idx in zip(replicas.tolist(), structure_index.tolist()):
        g = torch.Generator()
        g.manual_seed(graph_seed(seed, k, idx))
        gens.append(g)
    return gens


#: ``provider(domain, slot, rows, features) -> p (rows,)``: the dropout rate of one noisy layer.
#: ``features`` are the invariant features of that layer's input (rows, d), or None when the
#: provider does not ask for them (``wants_features`` False).
RateProvider = Callable[[str, int, int, "torch.Tensor | None"], torch.Tensor]


@dataclass
class NoiseContext:
    """Noise rates and random numbers for one forward pass.

    provider: gives each noisy layer its dropout rate ``p`` (rows,) when the layer runs; rates
    may depend on the layer's own input, so they are computed lazily, layer by layer.
    wants_features: whether layers pass their invariant input features to the provider.
    rows_per_graph: domain -> (G,) number of rows of each graph, in batch order.
    generators: one per graph, or None to draw from torch's global generator (training).
    kind: "gaussian" (BLIP, independent multiplicative weight noise, local reparameterisation),
    "gaussian_inputs" (BLIP, weight noise shared per input channel) or "bernoulli" (MC dropout).
    used: (domain, slot) -> the rates ``p`` (rows,) of every layer that ran (for the KL).
    """

    provider: RateProvider
    rows_per_graph: dict[str, torch.Tensor] = field(default_factory=dict)
    generators: list[torch.Generator] | None = None
    kind: str = "gaussian"
    wants_features: bool = False
    used: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def fixed(cls, rates: dict[str, torch.Tensor], rows_per_graph: dict | None = None,
              generators: list | None = None, kind: str = "gaussian") -> "NoiseContext":
        """A context with given rates: domain -> p of shape (rows, layers of the domain)."""
        return cls(lambda domain, slot, rows, features: rates[domain][:, slot], rows_per_graph or {},
                   generators, kind)

    def rate(self, domain: str, slot: int, rows: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Dropout rate ``p`` of the layers with rate slot ``slot``, shape (rows,); recorded in ``used``.

        A later layer of an MLP asks without features and gets the rate its first layer computed.
        """
        key = (domain, slot)
        if features is None and key in self.used:
            return self.used[key]
        p = self.provider(domain, slot, rows, features)
        self.used[key] = p
        return p

    def standard_normal(self, domain: str, rows: int, tail: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) draws of shape (rows, *tail), block-wise per graph when generators are set."""
        if self.generators is None:
            return torch.randn((rows, *tail), dtype=like.dtype, device=like.device)
        return self._blockwise(domain, rows, tail, like, torch.randn)

    def uniform(self, domain: str, rows: int, tail: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) draws of shape (rows, *tail), block-wise per graph when generators are set."""
        if self.generators is None:
            return torch.rand((rows, *tail), dtype=like.dtype, device=like.device)
        return self._blockwise(domain, rows, tail, like, torch.rand)

    def _blockwise(self, domain, rows, tail, like, draw):
        counts = self.rows_per_graph[domain].tolist()
        if sum(counts) != rows:
            raise RuntimeError(f"noise domain '{domain}': layer has {rows} rows but the graphs have {sum(counts)}")
        parts = [draw((n, *tail), generator=g, dtype=like.dtype) for n, g in zip(counts, self.generators)]
        return torch.cat(parts).to(like.device)


class NoiseState:
    """Holder shared by all noisy layers of one model; ``ctx`` is None outside sampling."""

    def __init__(self):
        self.ctx: NoiseContext | None = None

    @contextlib.contextmanager
    def use(self, ctx: NoiseContext | None):
        previous, self.ctx = self.ctx, ctx
        try:
            yield ctx
        finally:
            self.ctx = previous
