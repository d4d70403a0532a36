"""BayesianPotential: a backbone with BLIP noise (or a baseline's), energies and forces."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone
from .bayes import InferenceNet, NoiseContext, NoiseState, kl_divergence, make_generators, wrap

METHODS = ("blip", "deterministic", "mc_dropout", "ensemble")


class BayesianPotential(nn.Module):
    """One network: a backbone whose selected layers are noisy.

    method "blip": rates from the inference net, multiplicative Gaussian noise, KL to the prior.
    method "mc_dropout": fixed Bernoulli dropout rate ``dropout_p`` on the same layers.
    method "deterministic" (and ensemble members): no noise layers at all.
    """

    def __init__(self, backbone: Backbone, method: str = "blip", prior_p: float = 0.5,
                 p_min: float = 1e-5, p_max: float = 0.8, p_init: float = 0.05,
                 inference_hidden: int = 32, dropout_p: float = 0.1):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown uq.method {method!r}; choose from {', '.join(METHODS)}")
        self.backbone, self.method = backbone, method
        self.prior_p, self.dropout_p = prior_p, dropout_p
        self.noise_state = NoiseState()
        self.layers: dict[str, list[str]] = {}
        self.inference = None
        if method in ("blip", "mc_dropout"):
            self.layers = wrap(backbone, backbone.noisy_layers(), self.noise_state,
                               backbone.extra_noisy_factories())
        if method == "blip":
            dims = backbone.domain_feature_dims()
            slots = {d: len(names) for d, names in self.layers.items()}
            self.inference = InferenceNet(dims, slots, inference_hidden, p_min, p_max, p_init)

    @property
    def stochastic(self) -> bool:
        return self.method in ("blip", "mc_dropout")

    def _context(self, batch: dict, generators) -> tuple[NoiseContext, dict]:
        feats = self.backbone.domain_features(batch)
        counts = {d: c for d, (_, c) in feats.items()}
        if self.method == "blip":
            rates = self.inference({d: f for d, (f, _) in feats.items()})
            return NoiseContext(rates, counts, generators, "gaussian"), rates
        rates = {d: torch.full((f.shape[0], len(self.layers[d])), self.dropout_p, dtype=f.dtype, device=f.device)
                 for d, (f, _) in feats.items() if d in self.layers}
        return NoiseContext(rates, counts, generators, "bernoulli"), {}

    def forward(self, batch: dict, sample: bool = False, seed: int | None = None,
                forces: bool = True, training: bool = False) -> dict[str, torch.Tensor]:
        """Energies (G,) eV and forces (N, 3) eV/A of one pass; ``kl`` (scalar) when sampling BLIP.

        sample: draw noise (a Monte-Carlo sample); False gives the noise-free MAP pass.
        seed: with ``batch["replica"]`` and ``batch["structure_index"]``, makes the noise of each
        (replica, structure) block reproducible; None draws from torch's global generator.
        training: keep the graph for a loss on the forces (create_graph).
        """
        batch = self.backbone.prepare(dict(batch))
        positions = batch["positions"]
        if forces and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
            batch["positions"] = positions
        out: dict[str, torch.Tensor] = {}
        ctx = None
        if sample and self.stochastic:
            generators = None
            if seed is not None:
                replica = batch.get("replica", torch.zeros_like(batch["structure_index"]))
                generators = make_generators(seed, replica, batch["structure_index"])
            ctx, rates = self._context(batch, generators)
            if rates:
                out["kl"] = kl_divergence(rates, self.prior_p)
                out["rates"] = rates
        with self.noise_state.use(ctx):
            energy = self.backbone.energy(batch)
        out["energy"] = energy
        if forces:
            (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=training)
            out["forces"] = -grad
        return out
