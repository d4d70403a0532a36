"""Exponential moving average of a model's weights, at a few kernels per training step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ExponentialAverage(nn.Module):
    """A copy of ``model`` whose parameters follow an exponential moving average of the model's.

    After n updates the decay is ``min(decay, (1 + n) / (10 + n))`` (a warm-up: early weights
    are forgotten quickly); the first update copies the weights. Buffers (BLIP's feature
    statistics) are copied, not averaged. One multi-tensor kernel averages all parameters and
    one copies all buffers: the per-tensor loop of ``torch.optim.swa_utils.AveragedModel`` costs
    a few small kernels per tensor, which BLIP's many small rate heads and statistics turn into
    milliseconds per step. The state dict has ``AveragedModel``'s keys (``module.*``,
    ``n_averaged``), so checkpoints of either load.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=next(model.parameters()).device))
        self._updates = None  # Python copy of n_averaged (no device sync per step); None: read the buffer

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model``'s parameters into this copy's, copy its buffers."""
        n = int(self.n_averaged) if self._updates is None else self._updates
        mine, theirs = list(self.module.parameters()), list(model.parameters())  # no_grad: no detach needed
        if n == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            d = min(self.decay, (1.0 + n) / (10.0 + n))
            torch._foreach_lerp_(mine, theirs, 1.0 - d)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.n_averaged.fill_(n + 1)
        self._updates = n + 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None  # a loaded count is read again from the buffer
