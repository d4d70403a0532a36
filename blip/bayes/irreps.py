"""Noisy layers for equivariant (irreps) networks whose every noise sample is exactly equivariant.

Two layer types cover e3nn-based models such as MACE; this module depends on torch only
and reads the wrapped e3nn modules through their public attributes:

* :class:`NoisyIrrepsLinear` wraps an e3nn ``o3.Linear`` acting on irreps features.
  Noise is Gaussian dropout on irreps *channels* of the layer's input: every
  (row, channel, irrep) block of ``2l + 1`` components is multiplied by ONE factor
  ``1 + sqrt(alpha_row) * xi``, ``xi ~ N(0, 1)``. A scalar per irrep block commutes with
  the block's Wigner D-matrix, so each sample is exactly equivariant. It is multiplicative
  weight noise ``w_oc (1 + sqrt(alpha) xi_c)`` shared over the outputs o of input channel c
  (Kingma et al. 2015), so the KL of :func:`blip.bayes.inference.kl_divergence` applies unchanged. The local
  reparameterisation trick is NOT used here: for l > 0 it would draw independent noise
  per m component and break equivariance. With kind "gaussian" (``uq.weight_noise:
  independent``) the weights of the 0e -> 0e path take independent noise instead, by local
  reparameterisation on the layer's 0e outputs (:func:`scalar_path_noise`; scalars are
  invariant, so any noise on them is equivariant); the other irreps keep the channel factors.
* :class:`NoisyFCLayer` wraps one layer of an e3nn ``FullyConnectedNet`` (scalar
  features only, e.g. MACE's radial MLP that makes the tensor-product weights). It uses
  the local reparameterisation trick exactly like :class:`blip.bayes.NoisyLinear`, on
  the pre-activation, with e3nn's weight normalisation ``1 / sqrt(h_in * var_in)`` folded
  into the effective weight. Scalars are invariant, so any noise on them is equivariant.

Kind "bernoulli" (MC-dropout baseline): NoisyIrrepsLinear drops whole (row, channel,
irrep) blocks of its input, NoisyFCLayer drops input features; kept values are
rescaled by ``1 / (1 - p)``.

With noise off (``state.ctx is None``) both compute exactly what the wrapped layer does,
and both keep the wrapped layer's parameter and buffer names, so state dicts of the
unwrapped model load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .noise import NoiseContext, NoiseState

_TINY = 1e-12  # keeps sqrt differentiable where the variance is zero (as NoisyLinear)


def irreps_channel_index(irreps) -> torch.Tensor:
    """Channel of every feature column of an e3nn irreps layout (mul_ir), shape (dim,) long.

    ``irreps`` is an iterable of ``(mul, ir)`` with ``ir.dim == 2l + 1`` (an e3nn ``Irreps``).
    The ``2l + 1`` components of one copy of an irrep share one channel number;
    channels are numbered 0 .. (total multiplicity - 1) in layout order.
    """
    index, channel = [], 0
    for mul, ir in irreps:
        for _ in range(int(mul)):
            index.extend([channel] * int(ir.dim))
            channel += 1
    return torch.tensor(index, dtype=torch.long)


# TorchScript-compatible (blip.export compiles them): the maths of the sampled passes, shared by
# the layers below and the exported MACE models; the draws come in from the caller.
def channel_factors(p: torch.Tensor, draws: torch.Tensor, kind: str) -> torch.Tensor:
    """One multiplicative noise factor per (row, channel), shape (rows, channels), from rates ``p``
    (rows, 1) and ``draws`` (rows, channels): U(0, 1) for "bernoulli", N(0, 1) otherwise.

    gaussian kinds: ``1 + sqrt(alpha_row) * xi`` (mean 1, variance alpha); bernoulli: ``keep / (1 - p)``.
    """
    if kind == "bernoulli":
        keep = (draws >= p).to(draws.dtype)
        return keep / (1.0 - p)
    return 1.0 + torch.sqrt(p / (1.0 - p)) * draws  # both Gaussian kinds


def noisy_fc_preactivation(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, draws: torch.Tensor, kind: str,
                           tiny: float = _TINY) -> torch.Tensor:
    """Sampled pre-activation of a noisy e3nn dense layer (:class:`NoisyFCLayer`): input x (rows, h_in),
    normalised weight w (h_in, h_out), rates p (rows, 1); ``draws`` (rows, h_in) U(0, 1) for
    "bernoulli", (rows, h_in) N(0, 1) for "gaussian_inputs", (rows, h_out) N(0, 1) for "gaussian"."""
    if kind == "bernoulli":
        keep = (draws >= p).to(x.dtype)
        return (x * keep / (1.0 - p)) @ w
    if kind == "gaussian_inputs":  # as NoisyLinear: one factor per input channel
        return (x * (1.0 + torch.sqrt(p / (1.0 - p)) * draws)) @ w
    mean = x @ w
    var = (x * x) @ (w * w)
    return mean + torch.sqrt(p / (1.0 - p) * var + tiny) * draws


def scalar_path_noise(out: torch.Tensor, variance: torch.Tensor, p: torch.Tensor, draws: torch.Tensor,
                      scalar_out: torch.Tensor, path_weight: float, tiny: float = _TINY) -> torch.Tensor:
    """``out`` (rows, irreps_out.dim) plus independent weight noise of the 0e -> 0e path (local
    reparameterisation): each 0e output column o gets ``sqrt(alpha * pw^2 * sum_c w_oc^2 x_c^2) * xi_o``.

    ``variance``: the layer applied to the squared 0e inputs with squared weights, (rows, irreps_out.dim),
    which is ``pw * sum_c w_oc^2 x_c^2`` (e3nn multiplies a path by its weight pw once); ``p`` (rows, 1);
    ``draws`` (rows, len(scalar_out)) N(0, 1); ``scalar_out`` the 0e output columns.
    """
    alpha = p / (1.0 - p)
    std = torch.sqrt(alpha * variance.index_select(1, scalar_out) * path_weight + tiny)
    return out.index_add(1, scalar_out, std * draws)


def scalar_path(linear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """What :func:`scalar_path_noise` needs of an e3nn ``o3.Linear``: the 0e input columns as a 0/1 mask
    (dim_in,), the 0e output columns (long), and the 0e -> 0e path weight; weight 0 (no independent
    noise: the channel factors then act on every irrep) when the layer has biases, no 0e -> 0e path,
    or paths of different weights."""
    in_flags = even_scalar_channels(linear.irreps_in)[irreps_channel_index(linear.irreps_in)]
    out_flags = even_scalar_channels(linear.irreps_out)[irreps_channel_index(linear.irreps_out)]
    weights = {float(ins.path_weight) for ins in linear.instructions
               if _is_even_scalar(linear.irreps_in[ins.i_in].ir) and _is_even_scalar(linear.irreps_out[ins.i_out].ir)}
    has_bias = getattr(linear, "bias", None) is not None and linear.bias.numel() > 0
    weight = weights.pop() if len(weights) == 1 and not has_bias else 0.0
    return in_flags.to(torch.get_default_dtype()), torch.nonzero(out_flags).flatten(), weight


def channel_multipliers(ctx: NoiseContext, p: torch.Tensor, domain: str, slot: int, rows: int, channels: int,
                        like: torch.Tensor) -> torch.Tensor:
    """:func:`channel_factors` of one layer with the context's draws; ``p`` (rows, 1)."""
    if ctx.kind == "bernoulli":
        draws = ctx.uniform(domain, slot, rows, channels, like)
    else:
        draws = ctx.standard_normal(domain, slot, rows, channels, like)
    return channel_factors(p, draws, ctx.kind)


def _is_even_scalar(ir) -> bool:
    return int(ir.l) == 0 and int(ir.p) == 1


def even_scalar_channels(irreps) -> torch.Tensor:
    """Whether each channel of an irreps layout is an even scalar (0e), shape (channels,) bool."""
    flags = []
    for mul, ir in irreps:
        flags.extend([_is_even_scalar(ir)] * int(mul))
    return torch.tensor(flags, dtype=torch.bool)


def invariant_summary(x: torch.Tensor, channel_of: torch.Tensor, even_scalar: torch.Tensor,
                      tiny: float = _TINY) -> torch.Tensor:
    """Invariant features of irreps rows (rows, channels): the value of every 0e channel and the
    norm of every other (channel, irrep) block, which no rotation or inversion changes (TorchScript-compatible)."""
    squares = torch.zeros((x.shape[0], even_scalar.numel()), dtype=x.dtype, device=x.device)
    squares = squares.index_add(1, channel_of, x * x)
    scalar_value = torch.zeros_like(squares).index_add(1, channel_of, x)  # = x for one-column channels
    return torch.where(even_scalar, scalar_value, torch.sqrt(squares + tiny))


class NoisyIrrepsLinear(nn.Module):
    """An e3nn ``o3.Linear`` with Gaussian dropout on the irreps channels of its input.

    Input (rows, irreps_in.dim) -> output (rows, irreps_out.dim); rows are the layer's
    domain (nodes for MACE's linear layers). The wrapped layer is called with this
    module's ``weight`` and ``bias`` (e3nn's ``forward(x, weight, bias)``), so parameters
    live here under their original names and follow ``.to(dtype/device)``.
    """

    def __init__(self, linear: nn.Module, domain: str, slot: int, state: NoiseState):
        super().__init__()
        if getattr(linear, "irreps_in", None) is None or not getattr(linear, "internal_weights", True):
            raise TypeError("NoisyIrrepsLinear wraps an e3nn o3.Linear with internal weights")
        for name, param in linear.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in linear.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name in linear.state_dict(keep_vars=True))
        self.irreps_in, self.irreps_out = linear.irreps_in, linear.irreps_out
        self.register_buffer("channel_of", irreps_channel_index(linear.irreps_in), persistent=False)
        self.channels = int(self.channel_of.max()) + 1 if self.channel_of.numel() else 0
        self.register_buffer("even_scalar", even_scalar_channels(linear.irreps_in), persistent=False)
        scalar_in, scalar_out, self.scalar_path_weight = scalar_path(linear)
        self.register_buffer("scalar_in", scalar_in, persistent=False)
        self.register_buffer("scalar_out", scalar_out, persistent=False)
        self.domain, self.slot = domain, slot
        self.rate_slot = slot  # wrap() points the later layers of an MLP at the first one
        self._linear = (linear,)  # a tuple: not a submodule, so no duplicate parameters
        self._state = state  # plain attribute: shared, not a submodule

    @property
    def rate_features_dim(self) -> int:
        """Width of the invariant features given to the rate provider: one per input channel."""
        return self.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._state.ctx
        if ctx is not None:
            if x.dim() != 2 or x.shape[1] != self.channel_of.numel():
                raise RuntimeError(f"noisy irreps layer on domain '{self.domain}' expects "
                                   f"(rows, {self.channel_of.numel()}), got {tuple(x.shape)}")
            features = None
            if ctx.wants_features and self.rate_slot == self.slot:
                features = invariant_summary(x, self.channel_of, self.even_scalar)
            p = ctx.rate(self.domain, self.rate_slot, x.shape[0], features)[:, None]
            if ctx.kind == "gaussian" and self.scalar_path_weight > 0:
                return self._independent_scalar_path(ctx, x, p)
            factors = channel_multipliers(ctx, p, self.domain, self.slot, x.shape[0], self.channels, x)
            x = x * factors[:, self.channel_of]
        return self._linear[0](x, self.weight, self.bias)

    def _independent_scalar_path(self, ctx: NoiseContext, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Kind "gaussian": channel factors on the l > 0 (and odd scalar) channels, independent weight
        noise on the 0e -> 0e path; one batch of draws: the channels' first, then the 0e outputs'."""
        channels = self.channels
        draws = ctx.standard_normal(self.domain, self.slot, x.shape[0], channels + self.scalar_out.numel(), x)
        factors = channel_factors(p, draws[:, :channels] * (~self.even_scalar).to(x.dtype), "gaussian")
        out = self._linear[0](x * factors[:, self.channel_of], self.weight, self.bias)
        variance = self._linear[0](x * x * self.scalar_in.to(x.dtype), self.weight * self.weight, self.bias)
        return scalar_path_noise(out, variance, p, draws[:, channels:], self.scalar_out, self.scalar_path_weight)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, domain={self.domain}, slot={self.slot}"


class NoisyFCLayer(nn.Module):
    """One layer of an e3nn ``FullyConnectedNet`` with multiplicative Gaussian weight noise.

    MAP: ``act(x @ W / sqrt(h_in var_in)) * sqrt(var_out)`` (hidden layers) or
    ``x @ W / sqrt(h_in var_in / var_out)`` (last layer), as e3nn computes it.
    Sampled with the local reparameterisation trick on the pre-activation:
    ``x @ w + sqrt(alpha * (x**2) @ (w**2)) * eps`` with ``w`` the normalised weight and one
    ``alpha`` per row broadcast over output features. Input (rows, h_in) -> (rows, h_out).
    """

    def __init__(self, layer: nn.Module, domain: str, slot: int, state: NoiseState):
        super().__init__()
        self.weight = layer.weight  # (h_in, h_out), e3nn's layout
        self.act = layer.act
        self.h_in, self.h_out = int(layer.h_in), int(layer.h_out)
        self.var_in, self.var_out = float(layer.var_in), float(layer.var_out)
        self.domain, self.slot = domain, slot
        self.rate_slot = slot  # wrap() points the later layers of an MLP at the first one
        self._state = state

    def _normalised_weight(self) -> torch.Tensor:
        if self.act is not None:
            return self.weight / (self.h_in * self.var_in) ** 0.5
        return self.weight / (self.h_in * self.var_in / self.var_out) ** 0.5

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            return self.act(x) * self.var_out ** 0.5
        return x

    def _rate_features(self, ctx, x: torch.Tensor) -> torch.Tensor | None:
        """The input as rate features, for the first noisy layer of the MLP (later ones reuse its rate)."""
        return x if ctx.wants_features and self.rate_slot == self.slot else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._state.ctx
        w = self._normalised_weight()
        if ctx is None:
            return self._activate(x @ w)
        if x.dim() != 2:
            raise RuntimeError(f"noisy layer on domain '{self.domain}' expects (rows, features), got {tuple(x.shape)}")
        p = ctx.rate(self.domain, self.rate_slot, x.shape[0], self._rate_features(ctx, x))[:, None]
        channels = self.h_out if ctx.kind == "gaussian" else self.h_in
        if ctx.kind == "bernoulli":
            draws = ctx.uniform(self.domain, self.slot, x.shape[0], channels, x)
        else:
            draws = ctx.standard_normal(self.domain, self.slot, x.shape[0], channels, x)
        return self._activate(noisy_fc_preactivation(x, w, p, draws, ctx.kind))

    @property
    def rate_features_dim(self) -> int:
        """Width of the invariant features given to the rate provider (its scalar input)."""
        return self.h_in

    def extra_repr(self) -> str:
        return f"{self.h_in}->{self.h_out}, act={self.act is not None}, domain={self.domain}, slot={self.slot}"
