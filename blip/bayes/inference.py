"""The inference ("posterior") network and the KL divergence to the prior."""

from __future__ import annotations

import math

import torch
from torch import nn


class InferenceNet(nn.Module):
    """Maps invariant features of each domain to one dropout rate per noisy layer.

    feature_dims: domain -> feature width d; slots: domain -> number of noisy layers.
    forward({domain: (rows, d)}) -> {domain: p of shape (rows, slots)}, with
    ``p = clamp(sigmoid(logit), p_min, p_max)``; starts near ``p_init`` everywhere.
    """

    def __init__(self, feature_dims: dict[str, int], slots: dict[str, int], hidden: int = 32,
                 p_min: float = 1e-5, p_max: float = 0.8, p_init: float = 0.05):
        super().__init__()
        if not 0.0 < p_min <= p_init <= p_max < 1.0:
            raise ValueError(f"need 0 < p_min <= p_init <= p_max < 1, got {p_min}, {p_init}, {p_max}")
        self.p_min, self.p_max = p_min, p_max
        self.nets = nn.ModuleDict()
        for domain, n_slots in slots.items():
            net = nn.Sequential(nn.Linear(feature_dims[domain], hidden), nn.SiLU(), nn.Linear(hidden, n_slots))
            nn.init.normal_(net[2].weight, std=1e-3)
            nn.init.constant_(net[2].bias, math.log(p_init / (1.0 - p_init)))
            self.nets[domain] = net

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {d: torch.sigmoid(net(features[d])).clamp(self.p_min, self.p_max) for d, net in self.nets.items()}


def kl_divergence(rates: dict[str, torch.Tensor], prior_p: float) -> torch.Tensor:
    """Mean KL between the multiplicative-noise posterior and prior, a scalar.

    Per element ``0.5 * ((alpha + 1) / alpha0 + log(alpha0) - log(alpha) - 1) - 0.5 / alpha0``:
    the closed form of DESIGN.md section 1 minus its alpha-independent constant
    ``0.5 / alpha0``, so it is exactly zero at ``alpha == alpha0`` and positive elsewhere
    (same gradients). Averaged over rows for each layer, then over layers.
    rates: domain -> p of shape (rows, slots).
    """
    alpha0 = prior_p / (1.0 - prior_p)
    per_layer = []
    for p in rates.values():
        alpha = p / (1.0 - p)
        kl = 0.5 * (alpha / alpha0 - 1.0 - torch.log(alpha / alpha0))
        per_layer.append(kl.mean(dim=0))
    return torch.cat(per_layer).mean()
