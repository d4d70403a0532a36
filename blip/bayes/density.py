"""How far a row's features lie from the training data: a Gaussian per group (Mahalanobis).

One :class:`FeatureDensity` per noisy layer holds, for each group of rows (a species for
atoms, a species pair for edges), the mean and the covariance of that layer's invariant
input features over the training set. ``distance(x, groups)`` is the squared Mahalanobis
distance divided by the feature width: about 1 for training rows (less where the
covariance, shrunk towards its mean variance, has few large directions) and growing
without bound away from them; it is invariant to rotations, translations and
permutations because the features are.

Statistics are collected in two ways: an exponential moving average during training
(``update``), and an exact pass over the training set at the end (``begin_fit``,
``update`` for every batch, ``end_fit``).
"""

from __future__ import annotations

import torch
from torch import nn

SHRINKAGE = 1e-2  # least shrinkage of the covariance towards its mean variance (finite distances everywhere)
UPDATE_STRIDE = 4  # training batches per moving-average update
REFRESH_EVERY = 5  # moving-average updates between two whitening refreshes
_FLOOR = 1e-4  # variance floor (features are O(1)): layers whose inputs barely vary do not blow up


def _group_sums(x: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """Row count (G,), sum (G, d) and sum of outer products (G, d, d) of ``x`` per group."""
    count = torch.bincount(groups, minlength=n_groups).to(x.dtype)
    total = torch.zeros((n_groups, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, groups, x)
    outer = torch.zeros((n_groups, x.shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
    for g in (count > 0).nonzero(as_tuple=True)[0].tolist():
        rows = x[groups == g]
        outer[g] = rows.T @ rows
    return count, total, outer


class FeatureDensity(nn.Module):
    """Per-group mean (G, d), covariance and whitening matrix (G, d, d) of features of width d."""

    def __init__(self, groups: int, dim: int, momentum: float = 0.05):
        super().__init__()
        self.groups, self.dim, self.momentum = int(groups), int(dim), float(momentum)
        self.register_buffer("mean", torch.zeros(self.groups, self.dim))
        self.register_buffer("cov", torch.eye(self.dim).repeat(self.groups, 1, 1))
        self.register_buffer("whiten", torch.eye(self.dim).repeat(self.groups, 1, 1))
        self.register_buffer("seen", torch.zeros(self.groups))  # rows seen per group (EMA: > 0 once seen)
        # moving-average bookkeeping, buffers so that a checkpoint resumes it exactly
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._exact: tuple | None = None  # float64 (count, sum, sum of outer products) of an exact fit

    # -- statistics ---------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        """Add rows ``x`` (rows, d) of groups ``groups`` (rows,) to the statistics.

        Outside an exact pass this is a moving average over every ``UPDATE_STRIDE``-th call, and
        the whitening is refreshed every ``REFRESH_EVERY`` updates (eigendecompositions are not free).
        """
        if self._exact is None:
            self.calls += 1
            if int(self.calls) % UPDATE_STRIDE != 1 and self.seen.any():
                return  # the moving average takes every UPDATE_STRIDE-th batch: statistics drift slowly
        x = x.detach().double()
        count, total, outer = _group_sums(x, groups, self.groups)
        if self._exact is not None:
            c, s, o = self._exact
            self._exact = (c + count, s + total, o + outer)
            return
        present = (count > 0).nonzero(as_tuple=True)[0]
        if not present.numel():
            return
        n = count[present]
        mean = total[present] / n[:, None]
        cov = outer[present] / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
        old_mean, old_cov = self.mean[present].double(), self.cov[present].double()
        m = torch.where(self.seen[present] == 0, 1.0, self.momentum).double()
        delta = mean - old_mean
        new_cov = (1 - m)[:, None, None] * old_cov + m[:, None, None] * cov \
            + (m * (1 - m))[:, None, None] * delta[:, :, None] * delta[:, None, :]
        self.mean[present] = (old_mean + m[:, None] * delta).to(self.mean.dtype)
        self.cov[present] = new_cov.to(self.cov.dtype)
        first = bool((self.seen[present] == 0).any())
        self.seen[present] += n.to(self.seen.dtype)
        self.updates += 1
        if first or int(self.updates) % REFRESH_EVERY == 0:
            self._refresh()

    def begin_fit(self) -> None:
        """Start an exact pass: the following ``update`` calls accumulate float64 sums."""
        device = self.mean.device
        self._exact = (torch.zeros(self.groups, dtype=torch.float64, device=device),
                       torch.zeros((self.groups, self.dim), dtype=torch.float64, device=device),
                       torch.zeros((self.groups, self.dim, self.dim), dtype=torch.float64, device=device))

    @torch.no_grad()
    def end_fit(self) -> None:
        """Replace the statistics by those of the exact pass (groups not seen keep theirs)."""
        count, total, outer = self._exact
        self._exact = None
        present = (count > 0).nonzero(as_tuple=True)[0]
        mean = total[present] / count[present, None]
        cov = outer[present] / count[present, None, None] - mean[:, :, None] * mean[:, None, :]
        self.mean[present] = mean.to(self.mean.dtype)
        self.cov[present] = cov.to(self.cov.dtype)
        self.seen[present] = count[present].to(self.seen.dtype)
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        """Whitening ``diag(1 / sqrt(lambda)) V^T`` of the shrunk covariance (eigenvalues lambda).

        The covariance is shrunk towards its mean variance by ``max(SHRINKAGE, d / (d + n))`` with
        n the rows seen, so that a few rows (rank-deficient covariance) give a near-isotropic metric.
        """
        cov = self.cov.double()
        values, vectors = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
        values = values.clamp_min(0.0)
        shrink = (self.dim / (self.dim + self.seen.double())).clamp_min(SHRINKAGE)[:, None]
        values = (1 - shrink) * values + shrink * values.mean(dim=1, keepdim=True) + _FLOOR
        self.whiten.copy_((vectors / values.sqrt()[:, None, :]).transpose(1, 2).to(self.whiten.dtype))

    # -- scores ---------------------------------------------------------------------
    def standardise(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Whitened features ``W_g (x - mu_g)``, (rows, d); differentiable in ``x``."""
        centred = x - self.mean.to(x.dtype)[groups]
        if self.groups == 1:
            return centred @ self.whiten[0].to(x.dtype).T
        every = centred @ self.whiten.to(x.dtype).reshape(self.groups * self.dim, self.dim).T  # (rows, G*d)
        index = groups[:, None, None].expand(-1, 1, self.dim)
        return every.view(-1, self.groups, self.dim).gather(1, index).squeeze(1)

    def distance(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance over the width d, (rows,); about 1 on training rows."""
        z = self.standardise(x, groups)
        return (z * z).mean(dim=1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, dim={self.dim}"
