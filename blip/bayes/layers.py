"""Noisy layers: drop-in replacements whose MAP pass equals the wrapped layer exactly."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .irreps import channel_multipliers
from .noise import NoiseState

_TINY = 1e-12


# TorchScript-compatible (blip.export compiles them): constants come in as default arguments.
def draw_channels(kind: str, in_features: int, out_features: int) -> int:
    """Random numbers per row a noisy linear layer of this noise ``kind`` takes: one per output for
    "gaussian" (local reparameterisation), one per input otherwise."""
    return out_features if kind == "gaussian" else in_features


def noisy_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: torch.Tensor,
                 draws: torch.Tensor, kind: str, scale: Optional[torch.Tensor] = None,
                 tiny: float = _TINY) -> torch.Tensor:
    """One sampled pass of a noisy linear layer (:class:`NoisyLinear`): input h (rows, in), rates p
    (rows,), ``draws`` (rows, :func:`draw_channels`): U(0, 1) for "bernoulli", N(0, 1) otherwise;
    ``scale``: optionally ``sqrt(p / (1 - p))`` (rows, 1) when the caller has it ("gaussian_inputs")."""
    if kind == "gaussian_inputs":  # one factor per input channel, shared by the outputs
        if scale is None:
            scale = torch.sqrt(p[:, None] / (1.0 - p[:, None]))
        return F.linear(h * (1.0 + scale * draws), weight, bias)
    p = p[:, None]
    if kind == "bernoulli":
        keep = (draws >= p).to(h.dtype)
        return F.linear(h * keep / (1.0 - p), weight, bias)
    mean = F.linear(h, weight, bias)
    var = F.linear(h * h, weight * weight)
    return mean + torch.sqrt(p / (1.0 - p) * var + tiny) * draws


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
        p = ctx.rate(self.domain, self.rate_slot, h.shape[0], self._rate_features(ctx, h))
        rows, channels = h.shape[0], draw_channels(ctx.kind, self.in_features, self.out_features)
        if ctx.kind == "bernoulli":
            draws = ctx.uniform(self.domain, self.slot, rows, channels, h)
        else:
            draws = ctx.standard_normal(self.domain, self.slot, rows, channels, h)
        scale = ctx.noise_scale(self.domain, self.rate_slot) if ctx.kind == "gaussian_inputs" else None
        return noisy_linear(h, self.weight, self.bias, p, draws, ctx.kind, scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, domain={self.domain}, slot={self.slot}"


class VectorLinear(nn.Linear):
    """A bias-free channel-mixing ``nn.Linear`` applied to vector features (rows, 3, in) -> (rows, 3, out)
    (PaiNN's U and V); :func:`blip.bayes.wrap.wrap` turns it into a :class:`NoisyVectorLinear`."""


def vector_channel_norms(v: torch.Tensor, tiny: float = _TINY) -> torch.Tensor:
    """Norm of every channel of vector features (rows, 3, channels) -> (rows, channels): invariant
    rate features; ``tiny`` keeps the gradient finite where a channel is zero (a lone atom)."""
    return torch.sqrt((v * v).sum(dim=1) + tiny)


class NoisyVectorLinear(nn.Module):
    """:class:`VectorLinear` with multiplicative Gaussian noise on the weights of each input channel,
    ``w_oc (1 + sqrt(alpha) xi_c)``, i.e. Gaussian dropout of the input channels: one factor per
    (row, channel) shared by the three Cartesian components, so it commutes with rotations and
    every fixed-seed sample stays exactly equivariant (as MACE's irreps channels,
    :class:`blip.bayes.irreps.NoisyIrrepsLinear`, with the same factors). The rate comes from the channels' norms
    (invariant); the vector layers of one module (U and V) share the first one's rate
    (:func:`blip.bayes.wrap.wrap`), each with its own draws. Kind "bernoulli" (MC dropout) drops
    whole channels. The KL is the one of :class:`NoisyLinear` (the same noise per weight).

    Input (rows, 3, in_features) -> output (rows, 3, out_features).
    """

    def __init__(self, linear: nn.Linear, domain: str, slot: int, state: NoiseState):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("NoisyVectorLinear wraps bias-free layers (a bias would break equivariance)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = None
        self.domain, self.slot = domain, slot
        self.rate_slot = slot
        self._state = state

    @property
    def rate_features_dim(self) -> int:
        """Width of the invariant features this layer gives the rate provider (its channel norms)."""
        return self.in_features

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        ctx = self._state.ctx
        if ctx is None:
            return F.linear(v, self.weight)
        if v.dim() != 3 or v.shape[1] != 3:
            raise RuntimeError(f"noisy vector layer on domain '{self.domain}' expects (rows, 3, features), "
                               f"got {tuple(v.shape)}")
        features = vector_channel_norms(v) if ctx.wants_features and self.rate_slot == self.slot else None
        p = ctx.rate(self.domain, self.rate_slot, v.shape[0], features)
        factors = channel_multipliers(ctx, p[:, None], self.domain, self.slot, v.shape[0], self.in_features, v)
        return F.linear(v * factors[:, None, :], self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, domain={self.domain}, slot={self.slot}, vectors"
