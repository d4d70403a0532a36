"""Scale the learned term of every BLIP rate head (blip.bayes.inference.RateHead) by a factor.

A head's logit is ``logit(p_init) + 3 tanh(head(inputs) / 3) + slope (u - u0)``; the factor
multiplies the middle (learned, bounded) term: 1 is the model as trained, 0 keeps the distance
term alone. Used by rate_head_ablation.py and spread_ranking.py (run from this folder's scripts).
"""
import torch
from torch.nn import functional as F

from blip.bayes import inference


def scale_rate_heads(factor: float) -> None:
    """Patch ``RateHead.forward`` in this process so the learned term is multiplied by ``factor``."""

    def forward(self, inputs, u=None):
        out = self.net(inputs).squeeze(-1)
        if not hasattr(self, "slope"):
            return self.logit0 + factor * out
        term = F.softplus(self.slope) * (u - self.u0)
        term = term.sum(dim=-1) if term.dim() > 1 else term
        return self.logit0 + factor * self.bound * torch.tanh(out / self.bound) + term

    inference.RateHead.forward = forward
