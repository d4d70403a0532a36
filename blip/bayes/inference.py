"""The inference ("posterior") network that gives every noisy layer its dropout rates, and the KL.

Each noisy layer (domain, slot) has a small head. Its inputs, per row (atom, edge, ...):

* the domain's base features from the backbone (one-hot species; radial basis of edges), always;
* ``hidden``: the layer's own invariant input features, whitened by the training statistics
  of :class:`blip.bayes.density.FeatureDensity` (so the rate sees the chemical environment);
* ``distance``: ``u = log(c + m)`` with ``m`` the squared distance of those features from the
  training data over their width: ``euclidean``, in units of the mean feature variance (1 on
  average over training rows), or ``mahalanobis`` (below 1 on training rows where the
  features vary in few directions; exactly 1 on average with ``distance_mean_one``), see
  :class:`~blip.bayes.density.FeatureDensity`; ``both``: the two, each with its own slope;
  ``nearest``: the Euclidean distance to the nearest stored training rows (a bank per group).

``logit = logit(p_init) + head(inputs)``; with ``distance`` the head is bounded,
``bound * tanh(head / bound)``, and ``softplus(slope) * (u - u0)`` is added (summed over the
distances with ``both``), so far
from the training data the distance term dominates and rates grow monotonically with it. With the
offset c (``uq.distance_offset``), ``u = log(c + m)`` and ``u0 = log(c + 1)``: the term is zero at
m = 1 and the rate grows like ``(c + m)^softplus(slope)``; c = 1 (the default before 2026-12-05)
barely moves for m below 1, where the atoms of crystal defects lie, a small c resolves them.
``p = clamp(sigmoid(logit), p_min, p_max)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .density import BANK_ROWS, SHRINKAGE, FeatureDensity, GroupSplit

HEAD_BOUND = 3.0  # |bounded head| <= 3 logits: the distance term decides far from the data
METRICS = ("euclidean", "mahalanobis", "both", "nearest")  # of the feature distance
U_MAX = 30.0  # u beyond this saturates every rate anyway; non-finite features (a sample blown up far
# from the data) count as far away


class RateHead(nn.Module):
    """Logit of one noisy layer's rate from (rows, d_in) inputs and optionally a distance u: (rows,),
    or (rows, distances) with one slope per distance when ``distances`` > 1; ``offset``: the c of
    ``u = log(c + m)`` (:func:`rate_inputs`); ``slope``: softplus(slope) at the start (the
    distances' slopes sum to it)."""

    def __init__(self, d_in: int, hidden: int, logit0: float, distance: bool, distances: int = 1,
                 offset: float = 1.0, slope: float = 1.0):
        super().__init__()
        if not slope > 0.0:
            raise ValueError(f"the distance slope must be > 0, got {slope}")
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.net[2].weight, std=1e-3)
        nn.init.zeros_(self.net[2].bias)
        self.logit0 = float(logit0)
        self.bound, self.u0 = HEAD_BOUND, math.log(1.0 + offset)  # u at m = 1: the distance term is 0 there
        self.distance = distance
        if distance:
            start = math.log(math.expm1(slope / distances))  # softplus(start) = slope / distances
            self.slope = nn.Parameter(torch.tensor(start) if distances == 1 else torch.full((distances,), start))

    def forward(self, inputs: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.net(inputs).squeeze(-1)
        if not hasattr(self, "slope"):  # no distance term (the test is resolved when TorchScript compiles)
            return self.logit0 + out
        assert u is not None, "a rate head with a distance term needs the distance u"
        term = F.softplus(self.slope) * (u - self.u0)
        if term.dim() > 1:
            term = term.sum(dim=-1)
        return self.logit0 + self.bound * torch.tanh(out / self.bound) + term


# TorchScript-compatible (blip.export compiles them): constants come in as default arguments.
def rate_inputs(z: torch.Tensor, base: torch.Tensor, use_hidden: bool, distance: bool,
                m: Optional[torch.Tensor] = None, offset: float = 1.0,
                u_max: float = U_MAX) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs of a rate head and the distance ``u = log(offset + m)`` (or None) from whitened features
    ``z`` (rows, d) and the base features (rows, b); ``m`` (rows,) or (rows, k): the squared distance(s)
    over the width, by default the Mahalanobis one of ``z``. Non-finite features count as far away."""
    z = torch.nan_to_num(z, nan=0.0, posinf=1e6, neginf=-1e6)
    u: Optional[torch.Tensor] = None
    if distance:
        if m is None:
            m = (z * z).mean(dim=1)
        u = torch.log(m + offset).nan_to_num(nan=u_max).clamp(max=u_max)
    inputs = torch.cat([base, z], dim=1) if use_hidden else base
    return inputs, u


def log_feature_distance(z: torch.Tensor, u_max: float = U_MAX) -> torch.Tensor:
    """``log mean(z^2)`` (rows,) of whitened features ``z`` (rows, d): the log squared Mahalanobis
    distance over the width (about 0 on training rows); non-finite or huge values read ``u_max``."""
    m = (z * z).mean(dim=1)
    return torch.log(m.clamp_min(1e-12)).nan_to_num(nan=u_max, posinf=u_max).clamp(max=u_max)


def clamp_rate(logit: torch.Tensor, p_min: float, p_max: float) -> torch.Tensor:
    """``p = clamp(sigmoid(logit), p_min, p_max)``."""
    return torch.sigmoid(logit).clamp(p_min, p_max)


class InferenceNet(nn.Module):
    """Rates of every noisy layer: ``rate(domain, slot, base, features, groups) -> p (rows,)``.

    base_dims: domain -> width of the base features; layer_dims: domain -> {rate slot: width of
    the input features of the layer(s) using that rate}; groups: domain -> number of row groups (species,
    species pairs) of the feature statistics. ``hidden`` / ``distance`` choose the inputs
    (module docstring); ``detach``: in training steps the features enter detached (no gradient
    through them into the backbone, and the training forces ignore d(rate)/d(positions); every
    prediction keeps the full derivative, so each sample's forces are exact);
    ``distance_mean_one``: the densities' Mahalanobis distance has mean 1 on their own rows;
    ``shrinkage``: of the densities' covariance (:class:`~blip.bayes.density.FeatureDensity`);
    ``metric``: one of ``METRICS``, the feature distance(s) of the rate heads (module docstring);
    ``offset``: c > 0 of their distance term's ``log(c + m)``; ``slope``: the softplus of that
    term's slope at the start of training.
    """

    def __init__(self, base_dims: dict[str, int], layer_dims: dict[str, dict[int, int]], groups: dict[str, int],
                 hidden: int = 32, p_min: float = 1e-5, p_max: float = 0.8, p_init: float = 0.05,
                 use_hidden: bool = True, distance: bool = True, detach: bool = False,
                 distance_mean_one: bool = False, shrinkage: float = SHRINKAGE,
                 metric: str = "mahalanobis", offset: float = 1.0, slope: float = 1.0):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown distance metric {metric!r}; choose from {', '.join(METRICS)}")
        if not offset > 0.0:
            raise ValueError(f"the distance offset must be > 0, got {offset}")
        if not 0.0 < p_min <= p_init <= p_max < 1.0:
            raise ValueError(f"need 0 < p_min <= p_init <= p_max < 1, got {p_min}, {p_init}, {p_max}")
        self.p_min, self.p_max = p_min, p_max
        self.use_hidden, self.distance, self.detach = use_hidden, distance, detach
        self.metric, self.offset = metric, float(offset)
        logit0 = math.log(p_init / (1.0 - p_init))
        self.heads = nn.ModuleDict()
        self.densities = nn.ModuleDict()
        for domain, dims in layer_dims.items():
            self.heads[domain] = nn.ModuleDict({
                str(slot): RateHead(base_dims[domain] + (d if use_hidden else 0), hidden, logit0, distance,
                                    2 if metric == "both" else 1, self.offset, slope)
                for slot, d in dims.items()})
            if self.wants_features:
                self.densities[domain] = nn.ModuleDict({
                    str(slot): FeatureDensity(groups.get(domain, 1), d, mean_one=distance_mean_one,
                                              shrinkage=shrinkage, bank=BANK_ROWS if metric == "nearest" else 0)
                    for slot, d in dims.items()})

    @property
    def wants_features(self) -> bool:
        return self.use_hidden or self.distance

    def rate(self, domain: str, slot: int, base: torch.Tensor, features: torch.Tensor | None,
             groups: GroupSplit | torch.Tensor | None, update: bool = False, training: bool = False,
             memo: list | None = None, novelty: list | None = None) -> torch.Tensor:
        """Dropout rate p (rows,) of one layer; ``groups``: its rows' groups, (rows,) long or a
        :class:`~blip.bayes.density.GroupSplit` of them (computed once for all layers of a pass; None: one group);
        ``update`` adds the features to its statistics; ``training``: a training step, where
        ``detach`` applies.

        ``memo``: a list kept for one pass; layers fed the very same input tensor (the core and the
        gate of a gated MLP) whose densities hold equal statistics then share one whitening (the
        same values, computed once; forces then differ by float rounding only).

        ``novelty``: a list to which ``(domain, nu)`` is appended, ``nu`` (rows,) the log of the rows'
        squared Mahalanobis feature distance over the width (:func:`log_feature_distance`; no gradient),
        for layers that compute their own whitening."""
        head = self.heads[domain][str(slot)]
        with torch.enable_grad():  # the rates train even when the backbone pass does not
            if not self.wants_features:
                return self._clamp(head(base))
            density = self.densities[domain][str(slot)]
            if not isinstance(groups, GroupSplit):
                index = features.new_zeros(features.shape[0], dtype=torch.long) if groups is None else groups
                groups = GroupSplit.of(index, density.groups)
            if update:
                density.update(features, groups.index)
            shared = _twin(memo, features, base, density) if memo is not None else None
            if shared is None:
                source = features.detach() if self.detach and training else features
                centred = density.centred(source, groups.index)
                z = density.standardise_split(source, groups, centred)
                if self.distance and self.metric == "nearest":
                    m = density.nearest_split(source, groups)  # no host reads: device-clean
                else:
                    m = density.distances(source, groups.index, z, self.metric, centred) if self.distance else None
                shared = rate_inputs(z, base, self.use_hidden, self.distance, m, self.offset)
                if novelty is not None:
                    novelty.append((domain, log_feature_distance(z.detach())))
                if memo is not None:
                    memo[:] = [(features, base, density, shared)]
            return self._clamp(head(*shared))

    def _clamp(self, logit: torch.Tensor) -> torch.Tensor:
        return clamp_rate(logit, self.p_min, self.p_max)

    def heads_list(self) -> list[RateHead]:
        return [h for domain in self.heads.values() for h in domain.values()]

    def densities_list(self) -> list[FeatureDensity]:
        return [d for domain in self.densities.values() for d in domain.values()]


def _twin(memo: list, features: torch.Tensor, base: torch.Tensor, density: FeatureDensity):
    """The rate inputs in ``memo`` when they came from these very ``features`` and ``base`` tensors
    and a density with the same statistics as ``density`` (else None)."""
    if not memo:
        return None
    seen, seen_base, other, shared = memo[0]
    if seen is not features or seen_base is not base:
        return None
    if other is density or (torch.equal(other.mean, density.mean) and torch.equal(other.whiten, density.whiten)
                            and torch.equal(other.bank, density.bank) and torch.equal(other.cov, density.cov)):
        return shared
    return None


def kl_divergence(rates: dict, prior_p: float) -> torch.Tensor:
    """Mean KL between the multiplicative-noise posterior and prior, a scalar.

    Per element ``0.5 * ((alpha + 1) / alpha0 + log(alpha0) - log(alpha) - 1) - 0.5 / alpha0``:
    the KL between Gaussian multiplicative weight noise of variance alpha and a prior of variance
    alpha0 = prior_p / (1 - prior_p) (Kingma et al. 2015, closed form) minus its alpha-independent constant
    ``0.5 / alpha0``, so it is exactly zero at ``alpha == alpha0`` and positive elsewhere
    (same gradients). Averaged over rows for each layer, then over layers.
    rates: layer -> p of shape (rows,) or (rows, slots).
    """
    return torch.cat([s.kl / s.rows for s in kl_sums(rates, prior_p)]).mean()


class LayerSums(NamedTuple):
    """Sums over the rows of a group of noisy layers: ``kl`` (k,) of :func:`kl_divergence`'s
    per-element KL and ``rate`` (k,) of the rates p (detached), one entry per layer and slot;
    ``rows``: the rows of each of them."""

    kl: torch.Tensor
    rate: torch.Tensor
    rows: int


def kl_sums(rates: dict, prior_p: float) -> list[LayerSums]:
    """The layers' KL and rates summed over rows (:class:`LayerSums`), the layers of one domain
    (keys ``(domain, slot)``, the same rows) in one group and one batch of kernels; groups in the
    order of their first layer in ``rates``. ``kl_divergence`` is
    ``cat([s.kl / s.rows for s in kl_sums(...)]).mean()``; with rows counted over all ranks it is
    the KL of a global batch split over ranks (every rank has the same groups)."""
    alpha0 = prior_p / (1.0 - prior_p)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for key, p in rates.items():
        domain = key[0] if isinstance(key, tuple) else key
        groups.setdefault((domain, p.shape[0]), []).append(p if p.dim() == 2 else p[:, None])
    out = []
    for (_, rows), ps in groups.items():
        p = torch.cat(ps, dim=1) if len(ps) > 1 else ps[0]
        ratio = p / ((1.0 - p) * alpha0)  # alpha / alpha0
        kl = 0.5 * (ratio - 1.0 - torch.log(ratio))
        out.append(LayerSums(kl.sum(dim=0), p.detach().sum(dim=0), int(rows)))
    return out
