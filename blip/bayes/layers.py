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
    (node, edge, ...) broadcast over output channels; no noise on the bias. Kind
    "gaussian_inputs" shares the weight noise of each input channel over the outputs
    (Gaussian dropout of the input, ``y = W (h * (1 + sqrt(alpha) xi)) + b``): the same
    variance of every output and the same KL, with one matmul instead of two.
    In the "bernoulli" kind (MC dropout baseline) inputs are dropped with rate ``p``
    and rescaled by ``1 / (1 - p)``. The input must be invariant (scalar features): it is
    what the layer gives the rate provider, so that rates may depend on it. Parameters
    keep the names ``weight`` and ``bias`` so a state dict of the unwrapped model loads
    unchanged.

    Input (rows, in_features) -> output (rows, out_features).
    """

    def __init__(self, linear: nn.Linear, domain: str, slot: int, state: NoiseState):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.domain, self.slot = domain, slot
        self.rate_slot = slot  # wrap() points the later layers of an MLP at the first one
        self._state = state  # plain attribute: shared, not a submodule

    @property
    def rate_features_dim(self) -> int:
        """Width of the invariant features this layer gives the rate provider (its input)."""
        return self.in_features

    def _rate_features(self, ctx, h: torch.Tensor) -> torch.Tensor | None:
        """The input as rate features, for the first noisy layer of an MLP (later ones reuse its rate)."""
        return h if ctx.wants_features and self.rate_slot == self.slot else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = self._state.ctx
        if ctx is None:
            return F.linear(h, self.weight, self.bias)
        if h.dim() != 2:
            raise RuntimeError(f"noisy layer on domain '{self.domain}' expects (rows, features), got {tuple(h.shape)}")
        p = ctx.rate(self.domain, self.rate_slot, h.shape[0], self._rate_features(ctx, h))[:, None]
        if ctx.kind == "bernoulli":
            keep = (ctx.uniform(self.domain, self.slot, h.shape[0], h.shape[1], h) >= p).to(h.dtype)
            return F.linear(h * keep / (1.0 - p), self.weight, self.bias)
        if ctx.kind == "gaussian_inputs":  # one factor per input channel, shared by the outputs
            xi = ctx.standard_normal(self.domain, self.slot, h.shape[0], h.shape[1], h)
            return F.linear(h * (1.0 + torch.sqrt(p / (1.0 - p)) * xi), self.weight, self.bias)
        mean = F.linear(h, self.weight, self.bias)
        var = F.linear(h * h, self.weight * self.weight)
        eps = ctx.standard_normal(self.domain, self.slot, h.shape[0], self.out_features, h)
        return mean + torch.sqrt(p / (1.0 - p) * var + _TINY) * eps

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, domain={self.domain}, slot={self.slot}"
