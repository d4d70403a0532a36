"""How far a row's features lie from the training data: a Gaussian per group (Mahalanobis
distance, or a Euclidean one in units of the mean feature variance), or the distance to the
nearest training rows (a bank of stored training features per group).

One :class:`FeatureDensity` per noisy layer holds, for each group of rows (a species for
atoms, a species pair for edges), the mean and the covariance of that layer's invariant
input features over the training set. ``distance(x, groups)`` is the squared Mahalanobis
distance divided by the feature width: about 1 for training rows (less where the
covariance, shrunk towards its mean variance, has few large directions: about 0.05-0.09 for
pretrained CHGNet's features on silicon; exactly 1 on average with ``mean_one``) and growing
without bound away from them; it is invariant to rotations, translations and
permutations because the features are.

Statistics are collected in two ways: an exponential moving average during training
(``update``), and an exact pass over the training set at the end (``begin_fit``,
``update`` for every batch, ``end_fit``). With a bank, the moving-average phase keeps the rows
of recent batches (a ring buffer; a batch's own rows enter only after it has been scored) and
the exact pass a fixed pseudo-random sample of all training rows (hash-keyed, whatever the batching).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .noise import mix32

SHRINKAGE = 1e-2  # least shrinkage of the covariance towards its mean variance (finite distances everywhere)
UPDATE_STRIDE = 4  # training batches per moving-average update
REFRESH_EVERY = 5  # moving-average updates between two whitening refreshes
_FLOOR = 1e-4  # variance floor (features are O(1)): layers whose inputs barely vary do not blow up
BANK_ROWS = 512  # training rows kept per group for the nearest-row distance
NEAREST_TEMPERATURE = 0.05  # soft minimum over the bank: kernel width in units of the mean feature variance
#: the soft minimum drops bank rows whose term is below exp(-50) of the largest: below the float64 rounding
#: of the sum, and it keeps exp from subnormal numbers, which are 10-200x slower on a CPU
SOFT_MIN_FLOOR = -50.0


_SYNC = {"on": False, "weight": 1.0}


@contextmanager
def synchronised():
    """Within this block the statistics are summed over the ranks of ``torch.distributed``: every
    moving-average update and every exact fit uses the sums of all ranks' rows, so the statistics
    stay identical on every rank (and equal those of one process seeing the global batch). Every
    rank must then run the same sequence of passes; :func:`set_contribution` (0 or 1) lets a rank
    without rows of its own take part with a placeholder batch that adds nothing."""
    old = dict(_SYNC)
    _SYNC["on"], _SYNC["weight"] = True, 1.0
    try:
        yield
    finally:
        _SYNC.update(old)


def set_contribution(weight: float) -> None:
    _SYNC["weight"] = float(weight)


def _reduce(*tensors):
    """Sums over the ranks of float64 tensors (one all_reduce); the tensors unchanged outside sync."""
    from .. import distributed

    if not _SYNC["on"] or not distributed.active():
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    distributed.all_reduce_sum(flat)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tuple(out)


def _group_sums(x: torch.Tensor, groups: torch.Tensor, n_groups: int):
    """Row count (G,), sum (G, d) and sum of outer products (G, d, d) of ``x`` per group."""
    count = torch.bincount(groups, minlength=n_groups).to(x.dtype)
    total = torch.zeros((n_groups, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, groups, x)
    outer = torch.zeros((n_groups, x.shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
    for g in (count > 0).nonzero(as_tuple=True)[0].tolist():
        rows = x[groups == g]
        outer[g] = rows.T @ rows
    return count, total, outer


@dataclass
class GroupSplit:
    """The rows of one pass sorted by group, computed once per noise domain and shared by its
    layers: ``index`` (rows,) the group of every row, ``order`` (rows,) the rows sorted by group
    (stable), ``inverse`` (rows,) its inverse permutation, ``counts`` the rows of every group."""

    index: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    counts: list[int]

    @classmethod
    def of(cls, groups: torch.Tensor, n_groups: int) -> "GroupSplit":
        order = torch.argsort(groups, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        return cls(groups, order, inverse, torch.bincount(groups, minlength=n_groups).tolist())


def soft_nearest(rows: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor, temperature: float,
                 filled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft minimum over the bank of ``m_b = scale |row - bank_b|^2``: ``-t log(mean_b exp(-m_b / t))``,
    (rows,) from rows (rows, d) and bank (n, d). One product, one exponential; its gradient in the rows,
    ``2 scale (row - sum_b w_b bank_b)`` with w the softmax weights of the forward pass, is one more product
    (twice differentiable: under ``create_graph`` the weights are recomputed from the rows). Terms below
    ``exp(SOFT_MIN_FLOOR)`` of the largest are dropped. ``scale``: 0-d tensor; ``filled``: 0-d long tensor,
    only the first ``filled`` bank rows count (the mean over them; infinitely far when 0), for a bank
    being filled without reading its fill on the host."""
    if torch.jit.is_scripting():  # exported models: autograd's gradient of the same formula
        assert filled is None, "exported models slice their bank"
        return _soft_nearest_autograd(rows, bank, scale, temperature)
    mask = None
    if filled is not None:  # additive mask, 0 on the filled rows; an empty bank counts all rows, then inf
        unfilled = torch.arange(bank.shape[0], device=bank.device) >= filled
        mask = torch.zeros(bank.shape[0], dtype=rows.dtype, device=rows.device).masked_fill_(
            unfilled & (filled > 0), float("-inf"))
    if not rows.requires_grad:
        soft = _SoftNearest.values(rows, bank, scale, temperature, mask)[0]
    else:
        soft = _soft_nearest_fused(rows, bank, scale, temperature, mask)
    if filled is None:
        return soft
    soft = soft + temperature * torch.log(filled.clamp_min(1).to(rows.dtype) / bank.shape[0])  # mean over the filled
    return torch.where(filled > 0, soft, torch.full_like(soft, float("inf")))


def _soft_nearest_autograd(rows: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor,
                           temperature: float, floor: float = SOFT_MIN_FLOOR) -> torch.Tensor:
    squared = (rows * rows).sum(dim=1, keepdim=True) - 2.0 * rows @ bank.T + (bank * bank).sum(dim=1)[None, :]
    neg = -squared.clamp_min(0.0) * scale / temperature
    neg = torch.maximum(neg, neg.amax(dim=1, keepdim=True) + floor)
    return -temperature * (torch.logsumexp(neg, dim=1) - math.log(float(bank.shape[0])))


@torch.jit.unused
def _soft_nearest_fused(rows: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor,
                        temperature: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _SoftNearest.apply(rows, bank, scale, temperature, mask)


class _SoftNearest(torch.autograd.Function):
    """:func:`soft_nearest` with its gradient by hand (scale: a 0-d tensor, so no host sync)."""

    @staticmethod
    def values(rows, bank, scale, temperature: float, mask=None):
        """(soft minimum (rows,), softmax weights (rows, n)); ``mask`` (n,): added to the exponents
        (-inf drops a row; the mean is still over all n)."""
        c = scale / temperature
        neg = torch.addmm((bank * bank).sum(dim=1)[None, :], rows, bank.T, alpha=-2.0).mul_(-c)  # -(m_b - m_0) / t
        if mask is not None:
            neg.add_(mask)
        top = neg.amax(dim=1, keepdim=True)
        neg = neg.sub_(top).clamp_min_(SOFT_MIN_FLOOR)
        weights = (neg if mask is None else neg.add_(mask)).exp_()
        total = weights.sum(dim=1, keepdim=True)
        lse = top.squeeze(1) + total.log().squeeze(1)
        soft = scale * (rows * rows).sum(dim=1) - temperature * (lse - math.log(bank.shape[0]))
        return soft, weights.div_(total)

    @staticmethod
    def forward(ctx, rows, bank, scale, temperature: float, mask):
        soft, weights = _SoftNearest.values(rows, bank, scale, temperature, mask)
        ctx.save_for_backward(rows, bank, weights)
        ctx.scale, ctx.temperature, ctx.mask = scale, temperature, mask
        return soft

    @staticmethod
    def backward(ctx, grad):
        rows, bank, weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: weights as a function of the rows
            neg = (2.0 * rows @ bank.T - (bank * bank).sum(dim=1)[None, :]) * (ctx.scale / ctx.temperature)
            weights = torch.softmax(neg if ctx.mask is None else neg + ctx.mask, dim=1)
        pulled = weights @ bank
        return (2.0 * ctx.scale) * grad[:, None] * (rows - pulled), None, None, None, None


class FeatureDensity(nn.Module):
    """Per-group mean (G, d), covariance and whitening matrix (G, d, d) of features of width d."""

    __jit_ignored_attributes__ = ["_exact", "_pending", "_sample"]  # fitting state, not for exported models

    def __init__(self, groups: int, dim: int, momentum: float = 0.05, mean_one: bool = False,
                 shrinkage: float = SHRINKAGE, bank: int = 0):
        """``mean_one``: rescale the whitening so that the fitted Gaussian's own rows have a mean
        distance of exactly 1 (undoing what shrinkage and floor take off); ``shrinkage`` in [0, 1]:
        the least weight of the mean variance in the shrunk covariance (1: every direction counts
        alike, a Euclidean distance in units of the mean feature variance); ``bank``: training
        rows stored per group for :meth:`nearest` (0: none)."""
        super().__init__()
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"need 0 <= shrinkage <= 1, got {shrinkage}")
        self.groups, self.dim, self.momentum = int(groups), int(dim), float(momentum)
        self.mean_one, self.shrinkage = bool(mean_one), float(shrinkage)
        self.register_buffer("mean", torch.zeros(self.groups, self.dim))
        self.register_buffer("cov", torch.eye(self.dim).repeat(self.groups, 1, 1))
        self.register_buffer("whiten", torch.eye(self.dim).repeat(self.groups, 1, 1))
        self.register_buffer("seen", torch.zeros(self.groups))  # rows seen per group (EMA: > 0 once seen)
        # mean feature variance per group (diagonal of cov, at least _FLOOR): kept with cov, not saved
        self.register_buffer("mean_variance", self._mean_variance(), persistent=False)
        # moving-average bookkeeping, buffers so that a checkpoint resumes it exactly
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._exact: tuple | None = None  # float64 (count, sum, sum of outer products) of an exact fit
        self.bank_size = int(bank)  # the bank's buffers are saved only when there is one (older files load)
        keep = self.bank_size > 0
        self.register_buffer("bank", torch.zeros(self.groups, self.bank_size, self.dim), persistent=keep)
        self.register_buffer("bank_rows", torch.zeros(self.groups, dtype=torch.long), persistent=keep)  # filled
        self.register_buffer("bank_next", torch.zeros(self.groups, dtype=torch.long), persistent=keep)  # ring
        self._pending: dict[int, torch.Tensor] = {}  # rows of the last update, banked at the next one
        self._sample: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # exact pass: keys, rows, seen

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
        if self.bank_size:
            self._bank_rows(x.detach(), groups)
        x = x.detach().double()
        count, total, outer = _group_sums(x, groups, self.groups)
        if _SYNC["on"] and _SYNC["weight"] != 1.0:
            count, total, outer = (t * _SYNC["weight"] for t in (count, total, outer))
        if self._exact is not None:
            c, s, o = self._exact
            self._exact = (c + count, s + total, o + outer)
            return
        count, total, outer = _reduce(count, total, outer)
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
        self.mean_variance.copy_(self._mean_variance())
        first = bool((self.seen[present] == 0).any())
        self.seen[present] += n.to(self.seen.dtype)
        self.updates += 1
        if first or int(self.updates) % REFRESH_EVERY == 0:
            self._refresh()

    def _bank_rows(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        """Bank rows ``x`` (rows, d) of groups ``groups`` (rows,): in an exact pass, draw them into
        the uniform sample (each row keyed by a hash of its position among its group's rows of the
        pass, so the sample does not depend on how the pass is batched); else bank the previous
        update's rows and keep these for the next one (a group's first rows are banked at once)."""
        for g in torch.unique(groups).tolist():
            rows = x[groups == g]
            if self._exact is not None:
                _, _, seen = self._sample.get(g, (None, None, 0))
                position = torch.arange(seen, seen + rows.shape[0], device=rows.device, dtype=torch.int32)
                keys = mix32(position * 2 + 1).to(torch.long) & 0xFFFFFFFF
                if g in self._sample:
                    old_keys, old_rows, _ = self._sample[g]
                    keys, rows = torch.cat([old_keys, keys]), torch.cat([old_rows, rows])
                keep = torch.topk(keys, min(self.bank_size, keys.shape[0])).indices
                self._sample[g] = (keys[keep], rows[keep], seen + position.shape[0])
            elif int(self.bank_rows[g]) == 0:
                self._ring(g, rows)
            else:
                if g in self._pending:
                    self._ring(g, self._pending[g])
                self._pending[g] = rows.clone()

    def _ring(self, g: int, rows: torch.Tensor) -> None:
        """Write ``rows`` into group ``g``'s ring buffer (the newest ``bank_size`` of them)."""
        rows = rows[-self.bank_size:]
        at = (int(self.bank_next[g]) + torch.arange(rows.shape[0], device=rows.device)) % self.bank_size
        self.bank[g, at] = rows.to(self.bank.dtype)
        self.bank_next[g] = (int(self.bank_next[g]) + rows.shape[0]) % self.bank_size
        self.bank_rows[g] = min(self.bank_size, int(self.bank_rows[g]) + rows.shape[0])

    def _mean_variance(self, floor: float = _FLOOR) -> torch.Tensor:
        """Mean feature variance of every group (G,), at least ``floor``: the unit of the Euclidean distances."""
        return torch.diagonal(self.cov, dim1=1, dim2=2).mean(dim=1).clamp_min(floor)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            self.mean_variance.copy_(self._mean_variance())

    def begin_fit(self) -> None:
        """Start an exact pass: the following ``update`` calls accumulate float64 sums."""
        device = self.mean.device
        self._sample = {}
        self._exact = (torch.zeros(self.groups, dtype=torch.float64, device=device),
                       torch.zeros((self.groups, self.dim), dtype=torch.float64, device=device),
                       torch.zeros((self.groups, self.dim, self.dim), dtype=torch.float64, device=device))

    @torch.no_grad()
    def end_fit(self) -> None:
        """Replace the statistics by those of the exact pass (groups not seen keep theirs)."""
        count, total, outer = _reduce(*self._exact)
        self._exact = None
        present = (count > 0).nonzero(as_tuple=True)[0]
        mean = total[present] / count[present, None]
        cov = outer[present] / count[present, None, None] - mean[:, :, None] * mean[:, None, :]
        self.mean[present] = mean.to(self.mean.dtype)
        self.cov[present] = cov.to(self.cov.dtype)
        self.mean_variance.copy_(self._mean_variance())
        self.seen[present] = count[present].to(self.seen.dtype)
        if self.bank_size:
            for g, (_, rows, _) in self._sample.items():
                self.bank[g, :rows.shape[0]] = rows.to(self.bank.dtype)
                self.bank_rows[g], self.bank_next[g] = rows.shape[0], rows.shape[0] % self.bank_size
            self._sample, self._pending = {}, {}
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        """Whitening ``diag(1 / sqrt(lambda)) V^T`` of the shrunk covariance (eigenvalues lambda):
        the rate heads see principal-component coordinates.

        The covariance is shrunk towards its mean variance by ``max(SHRINKAGE, d / (d + n))`` with
        n the rows seen, so that a few rows (rank-deficient covariance) give a near-isotropic metric.
        Each eigenvector's sign is fixed (its largest entry positive) and the graded floor separates
        the eigenvalues of directions the data do not span, so statistics equal up to rounding (e.g.
        summed over ranks in another order) give whitened features equal up to rounding. (The
        symmetric form ``V diag(.) V^T`` would too, but measured worse: on the ethanol energy split
        it made the force sigma grow 2.6x instead of 1.9x on the high-energy half, recalibrated
        NLL -1.02 against -1.13, seed 0.)
        """
        cov = self.cov.double()
        # the variance floor is added before the decomposition and graded along the diagonal
        # (1 ... 2 x _FLOOR): directions the data do not span (equal, rounding-level eigenvalues
        # otherwise) get distinct eigenvalues, so their eigenvectors do not depend on rounding
        floor = _FLOOR * (1.0 + torch.arange(self.dim, dtype=cov.dtype, device=cov.device) / max(self.dim, 1))
        values, vectors = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)) + torch.diag(floor))
        values = values.clamp_min(_FLOOR)
        shrink = (self.dim / (self.dim + self.seen.double())).clamp_min(self.shrinkage)[:, None]
        values = (1 - shrink) * values + shrink * values.mean(dim=1, keepdim=True)
        if self.mean_one:  # the mean of (x - mu)^T W^T W (x - mu) / d over the Gaussian: 1
            own = torch.einsum("gij,gik,gkj->gj", vectors, cov, vectors)  # variance along each direction
            values = values * (own / values).mean(dim=1, keepdim=True).clamp_min(1e-12)
        largest = vectors.abs().argmax(dim=1, keepdim=True)  # (G, 1, d): row of each column's largest entry
        signs = torch.sign(vectors.gather(1, largest))
        vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
        self.whiten.copy_((vectors / values.sqrt()[:, None, :]).transpose(1, 2).to(self.whiten.dtype))

    # -- scores ---------------------------------------------------------------------
    def standardise(self, x: torch.Tensor, groups: torch.Tensor, centred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whitened features ``W_g (x - mu_g)``, (rows, d); differentiable in ``x``; ``centred``: the
        :meth:`centred` rows when the caller has them."""
        if centred is None:
            centred = self.centred(x, groups)
        if self.groups == 1:
            return centred @ self.whiten[0].to(x.dtype).T
        every = centred @ self.whiten.to(x.dtype).reshape(self.groups * self.dim, self.dim).T  # (rows, G*d)
        index = groups[:, None, None].expand(-1, 1, self.dim)
        return every.view(-1, self.groups, self.dim).gather(1, index).squeeze(1)

    def centred(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``x - mu_g`` (rows, d) of rows ``x`` (rows, d) of groups ``groups`` (rows,)."""
        return x - self.mean.to(x.dtype)[groups]

    def standardise_split(self, x: torch.Tensor, split: GroupSplit,
                          centred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`standardise` with the rows' groups as a :class:`GroupSplit`: one (rows_g, d) x (d, d)
        product per group instead of every row against every group's matrix (2-6x faster for
        3-9 groups; the same values, gradients summed in another order). ``centred``: the
        :meth:`centred` rows when the caller has them."""
        if self.groups == 1 or not x.shape[0]:
            return self.standardise(x, split.index, centred)
        if centred is None:
            centred = self.centred(x, split.index)
        whiten = self.whiten.to(x.dtype)
        parts = [rows @ whiten[g].T for g, rows in enumerate(torch.split(centred[split.order], split.counts))
                 if rows.shape[0]]
        return torch.cat(parts)[split.inverse]

    def euclidean(self, x: torch.Tensor, groups: torch.Tensor, centred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Squared Euclidean distance of rows ``x`` (rows, d) from their group's mean over the width,
        in units of the group's mean feature variance (at least the variance floor), (rows,); about 1 for
        training rows. Unlike :meth:`distance` it weighs a step alike in every direction, also
        along those in which the training features barely vary. ``centred``: the :meth:`centred`
        rows when the caller has them."""
        if centred is None:
            centred = self.centred(x, groups)
        return (centred * centred).mean(dim=1) / self.mean_variance.to(x.dtype)[groups]

    def nearest(self, x: torch.Tensor, groups: torch.Tensor, temperature: float = NEAREST_TEMPERATURE) -> torch.Tensor:
        """Squared Euclidean distance of rows ``x`` (rows, d) from the nearest banked training rows
        of their group over the width, in units of the group's mean feature variance, (rows,).

        A smooth minimum over the bank, ``-t log(mean_b exp(-m_b / t))`` (t = ``temperature``): at
        least the smallest distance, about it once that is well below the others. Unlike the
        Gaussian distances it is small only near rows the training set has, not between two
        clusters of them (e.g. a hydroxyl and a methyl H whose mean no training H is near).
        Rows of a group without banked rows are infinitely far."""
        variance = self.mean_variance.to(x.dtype)
        out = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
        for g in range(self.groups):
            n = int(self.bank_rows[g])
            sel = (groups == g).nonzero().squeeze(1)
            if n == 0 or sel.shape[0] == 0:
                continue
            scale = 1.0 / (x.shape[1] * variance[g])
            soft = soft_nearest(x[sel], self.bank[g, :n].to(x.dtype), scale, temperature)
            out = out.index_put((sel,), soft)
        return out

    @torch.jit.unused
    def nearest_split(self, x: torch.Tensor, split: GroupSplit,
                      temperature: float = NEAREST_TEMPERATURE) -> torch.Tensor:
        """:meth:`nearest` with the rows' groups as a :class:`GroupSplit`, without reading anything
        on the host: every group's whole bank enters, its unfilled rows masked on the device (the
        same values to rounding)."""
        variance = self.mean_variance.to(x.dtype)
        parts = []
        for g, rows in enumerate(torch.split(x[split.order], split.counts)):
            if rows.shape[0]:
                parts.append(soft_nearest(rows, self.bank[g].to(x.dtype), 1.0 / (x.shape[1] * variance[g]),
                                          temperature, self.bank_rows[g]))
        return torch.cat(parts)[split.inverse] if parts else x.new_zeros(0)

    def distances(self, x: torch.Tensor, groups: torch.Tensor, z: torch.Tensor, metric: str,
                  centred: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The squared distance(s) of a rate head's distance term for ``metric`` (``uq.distance_metric``),
        from rows ``x`` (rows, d) and their whitened features ``z``: None for "mahalanobis" (``rate_inputs``
        takes it from ``z``); (rows,) for "euclidean" and "nearest"; (rows, 2) for "both" (Euclidean,
        Mahalanobis). ``centred``: the :meth:`centred` rows when the caller has them."""
        if metric == "nearest":
            return self.nearest(x, groups)
        if metric == "mahalanobis":
            return None
        m = self.euclidean(x, groups, centred)
        if metric == "both":
            return torch.stack([m, (z * z).mean(dim=1)], dim=1)
        return m

    def distance(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance over the width d, (rows,); about 1 on training rows."""
        z = self.standardise(x, groups)
        return (z * z).mean(dim=1)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, dim={self.dim}" + (", mean_one=True" if self.mean_one else "")
                + (f", bank={self.bank_size}" if self.bank_size else ""))
