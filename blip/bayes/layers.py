"""Noisy layers: drop-in replacements whose MAP pass equals the wrapped layer exactly."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .noise import NoiseState

_TINY = 1e-12


class NoisyLinear(nn.Module):
    """``y = W h + b`` with multiplicative Gaussian weight noise ``w = theta (1 + sqrt(alpha) xi)``.

    Sampled with the local reparameterisation trick:
    ``y = W h + b + sqrt(alpha * (h**2) @ (W**2).T) * eps`` with one ``alpha`` per row
    (node, edge, ...) broadcast over output channels; no noise on the bias.
    In the "bernoulli" kind (MC dropout baseline) inputs are dropped with rate ``p``
    and rescaled by ``1 / (1 - p)``. Parameters keep the names ``weight`` and ``bias``
    so a state dict of the unwrapped model loads unchanged.

    Input (rows, in_features) -> output (rows, out_features).
    """

    def __init__(self, linear: nn.Linear, domain: str, slot: int, state: NoiseState):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.domain, self.slot = domain, slot
        self._state = state  # plain attribute: shared, not a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = self._state.ctx
        if ctx is None:
            return F.linear(h, self.weight, self.bias)
        if h.dim() != 2:
            raise RuntimeError(f"noisy layer on domain '{self.domain}' expects (rows, features), got {tuple(h.shape)}")
        if ctx.kind == "bernoulli":
            p = ctx.rate(self.domain, self.slot)[:, None]
            keep = (ctx.uniform(self.domain, h.shape[0], (h.shape[1],), h) >= p).to(h.dtype)
            return F.linear(h * keep / (1.0 - p), self.weight, self.bias)
        mean = F.linear(h, self.weight, self.bias)
        var = F.linear(h * h, self.weight * self.weight)
        eps = ctx.standard_normal(self.domain, h.shape[0], (self.out_features,), h)
        alpha = ctx.alpha(self.domain, self.slot)[:, None]
        return mean + torch.sqrt(alpha * var + _TINY) * eps

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, domain={self.domain}, slot={self.slot}"
