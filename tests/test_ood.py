"""Out-of-distribution mechanisms: feature statistics, distance-aware rates, the noise-contrastive prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from blip.build import build_backbone
from blip.backbones.painn import PaiNN
from blip.config import resolve
from blip.bayes.density import FeatureDensity, GroupSplit, soft_nearest
from blip.bayes.inference import InferenceNet
from blip.data import build_graph, collate
from blip.model import BayesianPotential
from blip.train.contrastive import REMOVED_DISTANCE, draws_of_graphs, perturbation_draws, perturbed_batch
from blip.train.loss import data_loss
from conftest import EXAMPLES


def _batch(atoms_list, dtype=torch.float64, labels=None):
    graphs = []
    for i, a in enumerate(atoms_list):
        s = labels[i] if labels else None
        graphs.append(build_graph(a, 5.0, index=i, energy=s.energy if s else None, forces=s.forces if s else None))
    return collate(graphs, dtype=dtype)


@pytest.fixture
def potential(acac_summary, acac_small):
    """Tiny BLIP-PaiNN (message and vector noise on) whose rates depend on hidden features and their distance from acac_small."""
    torch.manual_seed(0)
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=16, interactions=2, radial=8, vector_noise=True,
                                    message_noise=True),
                              p_init=0.05, weight_noise="per_input").double()
    for head in model.inference.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=0.5)
    model.fit_feature_statistics([_batch([s.atoms for s in acac_small])])
    return model


def test_density_distance_is_about_one_on_its_own_data_and_grows_away_from_it():
    torch.manual_seed(0)
    groups = torch.randint(0, 2, (4000,))
    x = torch.randn(4000, 6, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 0.5, 1, 1], dtype=torch.float64)
    x = x + 5.0 * groups[:, None]  # two well-separated groups
    density = FeatureDensity(2, 6).double()
    density.begin_fit()
    density.update(x[:2000], groups[:2000])
    density.update(x[2000:], groups[2000:])
    density.end_fit()
    assert float(density.distance(x, groups).mean()) == pytest.approx(1.0, abs=0.05)
    # the group's own statistics: a point of group 1 at group 0's mean is far away
    assert float(density.distance(x[groups == 0][:10], torch.ones(10, dtype=torch.long)).min()) > 5.0
    far = x[:10] + 10.0
    assert float(density.distance(far, groups[:10]).min()) > 20.0


def test_density_distance_mean_one_where_features_span_few_directions():
    """Shrinkage alone puts the training rows of such features far below a distance of 1 (2 of 32
    directions: 0.06), where the distance term of the rates stays off; ``mean_one`` rescales it."""
    torch.manual_seed(2)
    groups = torch.zeros(3000, dtype=torch.long)
    x = torch.randn(3000, 2, dtype=torch.float64) @ torch.randn(2, 32, dtype=torch.float64) + 1.0
    x = x + 1e-3 * torch.randn(3000, 32, dtype=torch.float64)
    off_plane = x[:10] + 0.1 * torch.randn(10, 32, dtype=torch.float64)  # leaves the plane of the data
    own, off = {}, {}
    for mean_one in (False, True):
        density = FeatureDensity(1, 32, mean_one=mean_one).double()
        density.begin_fit()
        density.update(x, groups)
        density.end_fit()
        own[mean_one] = float(density.distance(x, groups).mean())
        off[mean_one] = float(density.distance(off_plane, groups[:10]).min())
    assert own[False] < 0.1 and own[True] == pytest.approx(1.0, abs=0.02)
    assert off[True] > 4.0 and off[True] / off[False] == pytest.approx(1.0 / own[False], rel=0.02)


def test_density_euclidean_distance_weighs_every_direction_alike():
    """Equal steps along a wide and a narrow direction of the data are equally far in the Euclidean
    distance (in units of the mean variance; full shrinkage gives the same), while the Mahalanobis
    distance puts the narrow step 100x further."""
    torch.manual_seed(3)
    groups = torch.zeros(5000, dtype=torch.long)
    x = torch.randn(5000, 4, dtype=torch.float64) * torch.tensor([3.0, 1.0, 1.0, 0.03], dtype=torch.float64)
    steps = x.mean(0) + torch.tensor([[0.5, 0, 0, 0], [0, 0, 0, 0.5]], dtype=torch.float64)
    densities = {}
    for shrinkage in (0.01, 1.0):
        densities[shrinkage] = FeatureDensity(1, 4, shrinkage=shrinkage).double()
        densities[shrinkage].begin_fit()
        densities[shrinkage].update(x, groups)
        densities[shrinkage].end_fit()
    expected = torch.full((2,), 0.25 / 4 / float(x.var(0, correction=0).mean()), dtype=torch.float64)
    torch.testing.assert_close(densities[0.01].euclidean(steps, groups[:2]), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(densities[1.0].distance(steps, groups[:2]), expected, rtol=1e-3, atol=0)
    mahalanobis = densities[0.01].distance(steps, groups[:2])
    assert float(mahalanobis[1] / mahalanobis[0]) > 100.0
    assert float(densities[0.01].euclidean(x, groups).mean()) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="shrinkage"):
        FeatureDensity(1, 4, shrinkage=1.5)


def test_euclidean_metric_sets_the_rates_distance(acac_summary):
    """The distance term of a rate follows the chosen metric: with the bounded head silenced, the
    rate of features fitted with anisotropic statistics is exactly that of the Euclidean (or the
    Mahalanobis) distance, and the two differ; with ``both`` it is the sum of the two terms, each
    with its own slope (half of the single metric's at the start)."""
    rates = {}
    for metric in ("euclidean", "mahalanobis", "both"):
        torch.manual_seed(0)
        model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4),
                                  distance_metric=metric).double()
        assert model.inference.metric == metric
        domain, slot = next((d, int(s)) for d, heads in model.inference.heads.items() for s in heads)
        head, density = model.inference.heads[domain][str(slot)], model.inference.densities[domain][str(slot)]
        torch.nn.init.zeros_(head.net[2].weight)  # the bounded head adds nothing: rate = distance term
        if metric == "both":
            assert head.slope.shape == (2,)
            with torch.no_grad():
                head.slope.copy_(torch.tensor([0.3, -1.0]))  # different slopes: each distance keeps its own
        groups = torch.zeros(2000, dtype=torch.long)
        scales = torch.logspace(-2, 0.5, density.dim, dtype=torch.float64)
        density.begin_fit()
        density.update(torch.randn(2000, density.dim, dtype=torch.float64) * scales, groups)
        density.end_fit()
        features = torch.randn(50, density.dim, dtype=torch.float64)
        base = torch.zeros(50, head.net[0].in_features - density.dim, dtype=torch.float64)
        p = model.inference.rate(domain, slot, base, features, groups[:50])
        slopes = torch.nn.functional.softplus(head.slope)
        c = model.inference.offset
        u_euclidean = torch.log(c + density.euclidean(features, groups[:50])) - head.u0
        u_mahalanobis = torch.log(c + density.distance(features, groups[:50])) - head.u0
        if metric == "both":
            term = slopes[0] * u_euclidean + slopes[1] * u_mahalanobis
        else:
            term = slopes * (u_euclidean if metric == "euclidean" else u_mahalanobis)
        logit = head.logit0 + term
        torch.testing.assert_close(p, torch.sigmoid(logit).clamp(model.inference.p_min, model.inference.p_max))
        rates[metric] = p.detach()
    assert float((rates["mahalanobis"] / rates["euclidean"]).median()) > 10.0


def _distance_only_rate_head(summary, **uq):
    """(model, domain, slot, head, density): a tiny BLIP-PaiNN (float64) with ``uq`` settings, its first
    rate head's bounded term silenced (the rate is the distance term alone) and that head's feature
    density fitted on 2000 standard normal rows (m = 1 on average)."""
    torch.manual_seed(0)
    model = BayesianPotential(PaiNN(summary, cutoff=5.0, features=8, interactions=2, radial=4), **uq).double()
    domain, slot = next((d, int(s)) for d, heads in model.inference.heads.items() for s in heads)
    head, density = model.inference.heads[domain][str(slot)], model.inference.densities[domain][str(slot)]
    torch.nn.init.zeros_(head.net[2].weight)
    density.begin_fit()
    density.update(torch.randn(2000, density.dim, dtype=torch.float64), torch.zeros(2000, dtype=torch.long))
    density.end_fit()
    return model, domain, slot, head, density


def test_distance_offset_sets_how_rates_respond_to_small_distances(acac_summary):
    """``uq.distance_offset`` c: with the bounded head silenced the rate is exactly
    sigmoid(logit0 + slope (log(c + m) - log(c + 1))), equal for every c at m = 1; for features
    closer to the training data than m = 1 a small c spreads the rates over a much wider range."""
    spans = {}
    for offset in (1.0, 0.05):
        model, domain, slot, head, density = _distance_only_rate_head(acac_summary, distance_offset=offset)
        groups = torch.zeros(40, dtype=torch.long)
        rows = torch.linspace(0.05, 0.7, 40, dtype=torch.float64)[:, None]  # distances from the data
        x = torch.randn(40, density.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * rows
        base = torch.zeros(len(x), head.net[0].in_features - density.dim, dtype=torch.float64)
        p = model.inference.rate(domain, slot, base, x, groups)
        m = density.euclidean(x, groups)
        assert float(m.max()) < 1.0  # every row closer than the training rows' mean distance
        term = torch.nn.functional.softplus(head.slope) * (torch.log(offset + m) - math.log(offset + 1.0))
        torch.testing.assert_close(p, torch.sigmoid(head.logit0 + term).clamp(model.inference.p_min,
                                                                             model.inference.p_max))
        spans[offset] = float(p.detach().max() / p.detach().min())
    assert spans[0.05] > 3.0 * spans[1.0]
    with pytest.raises(ValueError, match="offset"):
        BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4), distance_offset=0.0)


def test_distance_slope_sets_how_fast_rates_grow_with_the_distance(acac_summary):
    """``uq.distance_slope`` s: the rate heads start with softplus(slope) = s, and with the bounded
    head silenced the rate's logit is exactly logit0 + s (log(c + m) - log(c + 1)), so between two
    rows the logits differ s times as much as with s = 1 (rates grow like (c + m)^s)."""
    logits = {}
    for slope in (1.0, 2.0):
        model, domain, slot, head, density = _distance_only_rate_head(acac_summary, distance_slope=slope)
        assert all(float(torch.nn.functional.softplus(h.slope.detach())) == pytest.approx(slope, rel=1e-6)
                   for h in model.inference.heads_list())
        groups = torch.zeros(3, dtype=torch.long)
        rows = torch.tensor([0.7, 1.0, 2.0], dtype=torch.float64)[:, None]  # close, typical, far
        x = torch.randn(3, density.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * rows
        base = torch.zeros(3, head.net[0].in_features - density.dim, dtype=torch.float64)
        p = model.inference.rate(domain, slot, base, x, groups).detach()
        m = density.euclidean(x, groups)
        c = model.inference.offset
        expected = head.logit0 + slope * (torch.log(c + m) - math.log(c + 1.0))
        assert bool(((p > model.inference.p_min) & (p < model.inference.p_max)).all())  # none clamped
        torch.testing.assert_close(torch.logit(p), expected)
        logits[slope] = torch.logit(p)
    torch.testing.assert_close(logits[2.0][2] - logits[2.0][0], 2.0 * (logits[1.0][2] - logits[1.0][0]))
    assert float(logits[2.0][2] - logits[2.0][0]) > 1.0  # the far row's rate is e times the close one's, and more
    with pytest.raises(ValueError, match="slope"):
        BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4), distance_slope=0.0)


def _nearest_by_hand(x, bank, variance, temperature):
    """The nearest-row distance of ``FeatureDensity.nearest`` in numpy: soft minimum over the bank."""
    m = ((x[:, None, :] - bank[None, :, :]) ** 2).sum(-1) / (x.shape[1] * variance)
    low = m.min(axis=1, keepdims=True)
    return low[:, 0] - temperature * np.log(np.exp(-(m - low) / temperature).mean(axis=1))


def test_nearest_distance_is_small_near_training_rows_and_large_between_their_clusters():
    """Two clusters in one group: the point halfway between them is at the Gaussian's mean (small
    Euclidean distance) but far from every training row, and only the nearest-row distance says so;
    the distance equals the soft minimum computed by hand; held-out rows of the clusters stay close."""
    torch.manual_seed(0)
    centres = torch.tensor([[-5.0, 0, 0, 0], [5.0, 0, 0, 0]], dtype=torch.float64)
    x = centres[torch.arange(1200) % 2] + 0.3 * torch.randn(1200, 4, dtype=torch.float64)
    groups = torch.zeros(1200, dtype=torch.long)
    density = FeatureDensity(1, 4, bank=256).double()
    density.begin_fit()
    density.update(x[:1000], groups[:1000])
    density.end_fit()
    assert int(density.bank_rows[0]) == 256
    between = torch.zeros(1, 4, dtype=torch.float64)
    held_out = x[1000:]
    assert float(density.euclidean(between, groups[:1])) < 0.1  # the Gaussian sees the mean as typical
    near_between = float(density.nearest(between, groups[:1]))
    near_held_out = density.nearest(held_out, groups[1000:])
    assert near_between > 5 * float(near_held_out.max())
    variance = float(torch.diagonal(density.cov[0]).mean())
    by_hand = _nearest_by_hand(held_out.numpy(), density.bank[0].numpy(), variance, 0.05)
    np.testing.assert_allclose(near_held_out.numpy(), by_hand, rtol=1e-9, atol=1e-12)
    assert near_between == pytest.approx(float(_nearest_by_hand(between.numpy(), density.bank[0].numpy(),
                                                                variance, 0.05)[0]), rel=1e-9)


def test_nearest_bank_of_an_exact_fit_is_a_fixed_sample_of_each_groups_rows():
    torch.manual_seed(1)
    x = torch.randn(900, 3, dtype=torch.float64)
    groups = torch.cat([torch.zeros(700, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    banks = []
    for split in (128, 37):  # batched differently: the same sample
        density = FeatureDensity(3, 3, bank=300).double()
        density.begin_fit()
        for rows in torch.arange(900).split(split):
            density.update(x[rows], groups[rows])
        density.end_fit()
        banks.append(density.bank.clone())
        assert density.bank_rows.tolist() == [300, 200, 0]  # at most bank rows; group 2 has none
        for g, count in ((0, 300), (1, 200)):
            own = x[groups == g]
            assert (density.bank[g, :count, None, :] == own[None]).all(-1).any(1).all()  # each one of the group's rows
            assert torch.unique(density.bank[g, :count], dim=0).shape[0] == count  # each once
        assert torch.isinf(density.nearest(x[:3], torch.full((3,), 2))).all()  # no rows: infinitely far
    torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=0)


def test_bank_is_saved_only_by_densities_that_have_one():
    """Model files keep the bank of a nearest-row density; other densities save no bank keys, so
    files written before the bank existed load unchanged."""
    with_bank, without = FeatureDensity(2, 3, bank=4), FeatureDensity(2, 3)
    assert {"bank", "bank_rows", "bank_next"} <= set(with_bank.state_dict())
    assert not {"bank", "bank_rows", "bank_next"} & set(without.state_dict())
    with_bank.begin_fit()
    with_bank.update(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 1, 1]))
    with_bank.end_fit()
    restored = FeatureDensity(2, 3, bank=4)
    restored.load_state_dict(with_bank.state_dict())
    x = torch.randn(5, 3)
    groups = torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(restored.nearest(x, groups), with_bank.nearest(x, groups), rtol=0, atol=0)
    assert restored.bank_rows.tolist() == [2, 4]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_of_a_group_split_reads_nothing_on_the_host_and_equals_nearest(dtype, monkeypatch):
    """The sampled forward's nearest-row distance (``nearest_split``: the whole bank, its unfilled rows
    masked on the device) gives the values and gradients of ``nearest`` for a full, a partly filled
    (moving average, 3 of 16 rows) and an empty bank, and converts no tensor to a Python number
    (each such read is a host synchronisation on a GPU)."""
    torch.manual_seed(0)
    density = FeatureDensity(3, 5, bank=16).to(dtype)
    density.begin_fit()
    density.update(torch.randn(100, 5, dtype=dtype), torch.zeros(100, dtype=torch.long))
    density.end_fit()
    density.update(torch.randn(3, 5, dtype=dtype) + 2.0, torch.ones(3, dtype=torch.long))  # first rows: banked at once
    assert density.bank_rows.tolist() == [16, 3, 0]
    rows = torch.randn(30, 5, dtype=dtype, requires_grad=True)
    groups = torch.arange(30) % 3
    split = GroupSplit.of(groups, 3)
    expected = density.nearest(rows, groups)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, lambda *a, _name=name, **k: pytest.fail(f"host read: Tensor.{_name}"))
        got = density.nearest_split(rows, split)
    assert torch.isinf(got[2::3]).all() and torch.isfinite(got[groups < 2]).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[groups < 2], expected[groups < 2], rtol=tol, atol=tol)
    grad_got = torch.autograd.grad(got[groups < 2].sum(), rows)[0]
    grad_expected = torch.autograd.grad(expected[groups < 2].sum(), rows)[0]
    torch.testing.assert_close(grad_got, grad_expected, rtol=tol, atol=tol)


def test_moving_average_bank_scores_a_batch_before_it_holds_its_rows():
    """During training a batch's rows enter the bank only at the next update, so the rates of a batch
    never see its own rows (a group's very first rows excepted: the bank starts from them)."""
    density = FeatureDensity(1, 2, bank=8).double()
    groups = torch.zeros(3, dtype=torch.long)
    batches = [torch.full((3, 2), float(k), dtype=torch.float64) for k in range(6)]
    expected = [{0}, {0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}]  # 8 rows: the oldest are overwritten
    for k, rows in enumerate(batches):
        for _ in range(4):  # UPDATE_STRIDE calls: the first of each four is taken
            density.update(rows, groups)
        held = {int(v) for v in density.bank[0, :int(density.bank_rows[0]), 0]}
        assert held == expected[k], k
        if k >= 2:  # this batch is not banked yet, the previous one is
            assert float(density.nearest(rows[:1], groups[:1])) > 5 * float(density.nearest(batches[k - 1][:1],
                                                                                            groups[:1]))


def _nearest_backbone(name, summary):
    if name == "painn":
        return PaiNN(summary, cutoff=5.0, features=16, interactions=2, radial=8)
    cfg = resolve({"model": {"backbone": "mace", "cutoff": 4.0, "hidden_irreps": "8x0e + 8x1o", "correlation": 2,
                             "num_interactions": 2, "num_radial": 4, "max_ell": 2, "radial_mlp": [8, 8],
                             "mlp_irreps": "4x0e", "edge_noise": True}})
    return build_backbone(cfg["model"], summary)


@pytest.mark.parametrize("backbone", ["painn", "mace"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fixed_seed_sample_with_nearest_rates_is_a_smooth_invariant_potential(acac_summary, acac_small, dtype,
                                                                              backbone):
    """With ``distance_metric: nearest`` (rates from the distance to banked training rows) a fixed-seed
    sample's forces are minus the finite-difference gradient of its energy (float64), and its energy
    is invariant and its forces rotate with the structure (both dtypes)."""
    torch.manual_seed(0)
    model = BayesianPotential(_nearest_backbone(backbone, acac_summary), p_init=0.05, weight_noise="per_input",
                              distance_metric="nearest").double()
    for head in model.inference.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=0.5)
    model.fit_feature_statistics([_batch([s.atoms for s in acac_small[:4]])])
    assert all(int(d.bank_rows.sum()) > 0 for d in model.inference.densities_list())
    model = model.to(dtype)
    atoms = acac_small[4].atoms.copy()  # not among the banked structures
    atoms.rattle(0.05, seed=2)  # off the training rows: the distance term varies with positions

    def sample(a):
        out = model(_batch([a], dtype=dtype), sample=True, seed=3)
        return float(out["energy"].detach()), out["forces"].detach().double().numpy()

    energy, forces = sample(atoms)
    rotation = Rotation.from_euler("xyz", [0.4, -0.9, 1.7])
    moved = atoms.copy()
    moved.positions = rotation.apply(atoms.positions) + [0.7, -1.2, 2.0]
    energy_moved, forces_moved = sample(moved)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert energy_moved == pytest.approx(energy, rel=tol, abs=tol)
    np.testing.assert_allclose(forces_moved, rotation.apply(forces), atol=tol * 10, rtol=0)
    if dtype == torch.float64:
        h = 1e-5
        for atom, axis in ((0, 0), (4, 2), (9, 1)):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[atom, axis] += h
            minus.positions[atom, axis] -= h
            numeric = -(sample(plus)[0] - sample(minus)[0]) / (2 * h)
            assert numeric == pytest.approx(forces[atom, axis], abs=1e-6)


def test_uq_distance_mean_one_reaches_every_feature_density(acac_summary):
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4),
                              distance_mean_one=True)
    densities = model.inference.densities_list()
    assert densities and all(d.mean_one for d in densities)
    default = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4))
    assert not any(d.mean_one for d in default.inference.densities_list())


def test_uq_distance_shrinkage_reaches_every_feature_density(acac_summary):
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=8, interactions=2, radial=4),
                              distance_shrinkage=0.3)
    densities = model.inference.densities_list()
    assert densities and all(d.shrinkage == 0.3 for d in densities)
    assert model.inference.metric == "euclidean"  # the default metric


def test_moving_average_statistics_approach_the_exact_ones():
    torch.manual_seed(1)
    x = torch.randn(20000, 4, dtype=torch.float64) @ torch.tensor([[1.0, 0.5, 0, 0], [0, 1, 0, 0],
                                                                     [0, 0, 2, 0], [0, 0, 0, 0.3]],
                                                                    dtype=torch.float64) + 3.0
    groups = torch.zeros(20000, dtype=torch.long)
    ema = FeatureDensity(1, 4, momentum=0.05).double()
    for chunk in x.split(25):  # every 4th batch enters the moving average
        ema.update(chunk, groups[:chunk.shape[0]])
    torch.testing.assert_close(ema.mean[0], x.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(ema.cov[0], torch.cov(x.T), atol=0.15, rtol=0)


def test_rates_of_a_fixed_seed_sample_are_invariant_to_rotation_and_translation(potential, acac_small):
    atoms = acac_small[0].atoms
    moved = atoms.copy()
    moved.positions = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).apply(atoms.positions) + [1.0, -2.0, 0.5]

    def rates(a):
        out = potential(_batch([a]), sample=True, seed=3, forces=False)
        return {k: v.detach() for k, v in out["rates"].items()}

    ref, rot = rates(atoms), rates(moved)
    # rates of phi (interaction 1 only: interaction 0 acts on species embeddings), the update MLPs
    # and the vector-mixing U and V of both interactions (one rate per pair, from the vector channels' norms)
    assert ref.keys() == rot.keys() and len(ref) == 1 + 2 + 2  # no edge noise by default
    assert max(float(v.std()) for v in ref.values()) > 1e-3  # rates do vary between rows
    for key in ref:
        torch.testing.assert_close(rot[key], ref[key], atol=1e-10, rtol=1e-8)


def test_noise_free_rates_permute_with_the_atoms(potential, acac_small):
    """With the noise switched off everywhere but in the rates, rates follow their atoms."""
    atoms = acac_small[1].atoms
    perm = np.random.default_rng(1).permutation(len(atoms))
    inf = potential.inference
    captured = []
    original = inf.rate

    def record(domain, slot, base, features, groups, update=False, training=False, memo=None, novelty=None):
        p = original(domain, slot, base, features, groups, update, training, memo)
        if domain == "node":
            captured.append(p.detach())
        return torch.zeros_like(p)  # no noise: the features are the noise-free ones

    inf.rate = record
    try:
        potential.rates(_batch([atoms]))
        first = captured[:]
        captured.clear()
        potential.rates(_batch([atoms[perm]]))
    finally:
        inf.rate = original
    for a, b in zip(first, captured):
        torch.testing.assert_close(b, a[perm], atol=1e-10, rtol=1e-8)


def test_contrastive_pass_trains_only_the_inference_net_and_leaves_the_data_loss_alone(potential, acac_small):
    from blip.bayes import kl_divergence

    structures = acac_small[:3]
    labelled = _batch([s.atoms for s in structures], labels=structures)
    before = data_loss(potential(labelled), labelled, "mse", 1.0, 100.0).detach()
    state = {k: v.clone() for k, v in potential.state_dict().items()}

    copies = perturbed_batch(labelled, np.random.default_rng(0), (0.1, 0.3), (0.1, 0.3))
    assert "energy" not in copies and "forces" not in copies  # unlabelled
    assert not torch.allclose(copies["positions"], labelled["positions"])
    kl = kl_divergence(potential.rates(copies), 0.5)
    kl.backward()
    assert all(p.grad is None or not p.grad.any() for p in potential.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in potential.inference.parameters())
    # the contrastive pass changed no weight, no feature statistic and not the labelled batch ...
    for key, value in potential.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "energy" in labelled and "forces" in labelled
    # ... so the data loss of the labelled structures is the same
    after = data_loss(potential(labelled), labelled, "mse", 1.0, 100.0).detach()
    assert float(after) == float(before)


def test_perturbed_copies_are_rattled_or_scaled_copies_on_the_same_graph(acac_small):
    batch = _batch([s.atoms for s in acac_small])
    copies = perturbed_batch(batch, np.random.default_rng(3), (0.2, 0.2), (0.25, 0.25))
    assert torch.equal(copies["edge_index"], batch["edge_index"])
    for g in range(batch["n_atoms"].shape[0]):
        atoms = batch["batch"] == g
        before, after = batch["positions"][atoms], copies["positions"][atoms]
        d0, d1 = torch.pdist(before), torch.pdist(after)
        ratio = d1 / d0
        scaled = torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-9)
        if scaled:  # every distance scaled by 1.25 or 1 / 1.25 about the centre
            assert float(ratio[0]) == pytest.approx(1.25) or float(ratio[0]) == pytest.approx(1 / 1.25)
        else:  # rattled with a standard deviation of 0.2 A per coordinate
            assert float((after - before).std()) == pytest.approx(0.2, rel=0.35)


def test_removal_copies_move_some_atoms_out_of_every_cutoff_and_leave_the_rest(acac_small):
    """With ``remove`` a copy either is rattled / scaled as before or loses a fraction of its atoms:
    those sit farther than any cutoff from every other atom (every edge touching them is long), the
    others keep their positions exactly, so they lose neighbours; the graph is the original's."""
    from blip.backbones.base import edge_vectors

    batch = _batch([s.atoms for s in acac_small] * 3)
    n_atoms = batch["n_atoms"].numpy()
    draws = perturbation_draws(np.random.default_rng(1), n_atoms, (0.1, 0.1), (0.2, 0.2), (0.3, 0.3))
    copies = perturbed_batch(batch, None, (0.1, 0.1), (0.2, 0.2), draws=draws)
    assert torch.equal(copies["edge_index"], batch["edge_index"])
    moved = (copies["positions"] - batch["positions"]).norm(dim=1)
    removed = moved > 0.5 * REMOVED_DISTANCE
    kinds = [p[2] > 0 for p in draws[0]]
    assert any(kinds) and not all(kinds)
    for g, is_removal in enumerate(kinds):
        atoms = batch["batch"] == g
        if is_removal:
            assert removed[atoms].any() and not removed[atoms].all()
            assert float(moved[atoms & ~removed].max()) < 1e-12  # kept in place (to rounding)
            assert abs(float(removed[atoms].double().mean()) - 0.3) < 0.3
        else:
            assert not removed[atoms].any()
    i, j = batch["edge_index"]
    touching = removed[i] | removed[j]
    assert touching.any() and float(edge_vectors(copies)[touching].norm(dim=1).min()) > 100.0
    in_removal_copy = torch.tensor(kinds)[batch["batch"][i]]
    kept = in_removal_copy & ~touching  # the atoms left behind keep their pair geometry
    assert kept.any()
    torch.testing.assert_close(edge_vectors(copies)[kept], edge_vectors(batch)[kept], rtol=0, atol=1e-12)


def test_contrastive_draws_of_a_rank_are_its_graphs_rows():
    """A data-parallel rank takes the draws of its own graphs out of the global batch's draws."""
    n_atoms = np.array([3, 5, 2, 4])
    draws = perturbation_draws(np.random.default_rng(0), n_atoms, (0.1, 0.2), (0.1, 0.2), (0.1, 0.5))
    params, normals, uniforms = draws_of_graphs(draws, n_atoms, [2, 0])
    assert params == [draws[0][2], draws[0][0]]
    np.testing.assert_array_equal(normals, np.concatenate([draws[1][8:10], draws[1][0:3]]))
    np.testing.assert_array_equal(uniforms, np.concatenate([draws[2][8:10], draws[2][0:3]]))
    # without removal the draws are those of before the option existed: (params, normals) only
    assert len(perturbation_draws(np.random.default_rng(0), n_atoms, (0.1, 0.2), (0.1, 0.2))) == 2
    from blip.config import resolve
    from blip.errors import ConfigError

    assert resolve({"uq": {"contrastive": {"remove": [0.05, 0.3]}}})["uq"]["contrastive"]["remove"] == [0.05, 0.3]
    for bad in ([0.3, 0.05], [0.1, 1.5], 0.2):
        with pytest.raises(ConfigError, match="contrastive.remove"):
            resolve({"uq": {"contrastive": {"remove": bad}}})


def test_trained_model_is_more_uncertain_on_a_distorted_structure(tmp_path):
    """A tiny BLIP trained on a few acac structures: force sigma on strongly rattled copies of
    training structures exceeds that on the training structures themselves by a clear margin."""
    import blip
    from blip.train.loop import Trainer
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, training={"epochs": 6, "batch_size": 4, "seed": 0}, data={"max_train": 16})
    model = Trainer(cfg, progress=False).run()
    train_atoms = [a for a in blip.data.read_structures(cfg["data"]["train_file"])[:6]]
    rng = np.random.default_rng(0)
    distorted = []
    for a in train_atoms:
        b = a.copy()
        b.positions += rng.normal(scale=0.3, size=b.positions.shape)
        distorted.append(b)
    near = model.predict(train_atoms, samples=16, seed=0)
    far = model.predict(distorted, samples=16, seed=0)
    sigma_near = np.mean([f.mean() for f in near["forces_std"]])
    sigma_far = np.mean([f.mean() for f in far["forces_std"]])
    assert sigma_far > 2.0 * sigma_near, (sigma_far, sigma_near)


def test_rates_reach_p_max_far_from_the_training_features():
    """Whatever the bounded head says, the distance term takes the rate to p_max far from the data."""
    from blip.bayes import InferenceNet

    torch.manual_seed(0)
    net = InferenceNet({"node": 2}, {"node": {0: 4}}, {"node": 1}, p_min=1e-5, p_max=0.5, p_init=1e-3).double()
    for head in net.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=2.0)  # a head that varies strongly
    x = torch.randn(500, 4, dtype=torch.float64)
    groups = torch.zeros(500, dtype=torch.long)
    density = net.densities["node"]["0"]
    density.begin_fit()
    density.update(x, groups)
    density.end_fit()
    base = torch.zeros(50, 2, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(50, 4, dtype=torch.float64), dim=1)
    mean_rate = [float(net.rate("node", 0, base, t * directions, groups[:50]).mean().detach())
                 for t in (0.0, 3.0, 10.0, 100.0, 1e4)]
    assert mean_rate == sorted(mean_rate)  # grows with the distance on average
    assert mean_rate[0] < 0.05 and mean_rate[-1] == pytest.approx(0.5)


def test_strained_periodic_copies_scale_every_edge_vector():
    from ase.build import bulk

    from blip.backbones.base import edge_vectors

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    batch = collate([build_graph(atoms, 5.0)], dtype=torch.float64)
    copies = perturbed_batch(batch, np.random.default_rng(0), (0.0, 0.0), (0.2, 0.2))  # strain or no-op rattle
    ratio = edge_vectors(copies).norm(dim=1) / edge_vectors(batch).norm(dim=1)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-12)
    assert float(ratio[0]) in (pytest.approx(1.0), pytest.approx(1.2), pytest.approx(1 / 1.2))
    torch.testing.assert_close(copies["cell"], batch["cell"] * ratio[0])


def _fitted_density(groups: int, dim: int, seed: int) -> FeatureDensity:
    torch.manual_seed(seed)
    density = FeatureDensity(groups, dim).double()
    rows = torch.randint(0, groups, (600,))
    density.begin_fit()
    density.update(torch.randn(600, dim, dtype=torch.float64) * (1.0 + rows[:, None]) + rows[:, None], rows)
    density.end_fit()
    return density


@pytest.mark.parametrize("rows", [0, 1, 257])
def test_whitening_group_by_group_equals_every_row_against_every_group(rows):
    """``standardise_split`` (one product per group) gives the numbers and gradients of ``standardise``,
    also with groups that have no rows in the pass."""
    density = _fitted_density(5, 7, seed=3)
    groups = torch.randint(0, 3, (rows,)) * 2  # groups 0, 2, 4 only
    x = torch.randn(rows, 7, dtype=torch.float64, requires_grad=True)
    split = GroupSplit.of(groups, 5)
    assert split.counts[1] == split.counts[3] == 0 and sum(split.counts) == rows
    assert torch.equal(groups[split.order], torch.sort(groups).values)
    fast, slow = density.standardise_split(x, split), density.standardise(x, groups)
    assert fast.shape == (rows, 7)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    if rows:
        weights = torch.randn(rows, 7, dtype=torch.float64)
        (g_fast,) = torch.autograd.grad((fast * weights).sum(), x)
        (g_slow,) = torch.autograd.grad((slow * weights).sum(), x)
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-12, atol=1e-12)


def test_layers_fed_the_same_input_share_one_whitening_only_when_their_statistics_agree(monkeypatch):
    """The core and gate of a gated MLP see one input tensor: with a pass's memo the second layer reuses
    the first one's whitening when both densities hold equal statistics, and computes its own otherwise;
    the rates equal those computed without the memo either way."""
    net = InferenceNet({"edge": 3}, {"edge": {0: 6, 1: 6}}, {"edge": 2}, p_max=0.5).double()
    for head in net.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=0.5)
    calls = []
    original = FeatureDensity.standardise_split
    monkeypatch.setattr(FeatureDensity, "standardise_split",
                        lambda self, x, split, *rest: calls.append(self) or original(self, x, split, *rest))
    torch.manual_seed(0)
    base, features = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    groups = GroupSplit.of(torch.randint(0, 2, (40,)), 2)
    for same in (True, False):
        for slot in (0, 1):
            fitted = _fitted_density(2, 6, seed=0 if same else slot)
            net.densities["edge"][str(slot)].load_state_dict(fitted.state_dict())
        alone = [net.rate("edge", slot, base, features, groups) for slot in (0, 1)]
        calls.clear()
        memo: list = []
        shared = [net.rate("edge", slot, base, features, groups, memo=memo) for slot in (0, 1)]
        assert len(calls) == (1 if same else 2)
        assert not torch.equal(shared[0], shared[1])  # each layer keeps its own head
        for a, b in zip(alone, shared):
            assert torch.equal(a, b)
        calls.clear()
        net.rate("edge", 1, base, features.clone(), groups, memo=memo)  # another tensor: its own whitening
        assert len(calls) == 1


def test_non_finite_features_count_as_far_away():
    """A sample blown up far from the data (inf / nan features) gets the largest distance, in both metrics."""
    from blip.bayes.inference import U_MAX, rate_inputs

    z = torch.tensor([[0.1, -0.2], [float("inf"), 0.0], [float("nan"), 0.0]], dtype=torch.float64)
    base = torch.zeros(3, 1, dtype=torch.float64)
    m = torch.tensor([0.5, float("inf"), float("nan")], dtype=torch.float64)
    _, u_euclidean = rate_inputs(z, base, True, True, m)
    torch.testing.assert_close(u_euclidean, torch.tensor([math.log1p(0.5), U_MAX, U_MAX], dtype=torch.float64))
    inputs, u_mahalanobis = rate_inputs(z, base, True, True)
    assert torch.isfinite(inputs).all() and float(u_mahalanobis[1]) > 20.0


def test_a_runaway_float32_sample_far_out_gives_a_huge_finite_spread_not_inf():
    """Far out of distribution a noise sample can run away (|force| ~ 1e25 eV/A in float32); its
    deviation must not overflow when squared, so the spread reports it instead of inf."""
    from blip.predictor import BlipModel

    model = BlipModel([], resolve({"uq": {"force_std": "component", "force_std_floor": 0.0}}), summary=None)
    forces = np.zeros((4, 2, 3), dtype=np.float32)
    forces[1, 0, 0] = 2e25  # one runaway sample of one component
    out = model._summarise({"energy": [np.zeros(4)], "forces": [forces]}, stochastic=True,
                           means={"energy": [0.0], "forces": [np.zeros((2, 3), dtype=np.float32)]})
    std = out["forces_std"][0]
    assert np.all(np.isfinite(std))
    assert std[0, 0] == pytest.approx(2e25 / 2.0, rel=1e-6)  # sqrt(mean of (0, 4e50, 0, 0))
    assert std[1, 1] == 0.0


def test_auto_distance_metric_is_nearest_for_painn_on_crystals_and_euclidean_otherwise():
    """``uq.distance_metric: auto`` (the default from scratch) resolves from the training data's
    periodicity and the backbone (nearest was measured with PaiNN only); an explicit metric stays."""
    from dataclasses import replace

    from blip.backbones.base import DatasetSummary
    from blip.build import build_potential, distance_metric

    molecules = DatasetSummary(elements=[1, 6, 8])
    crystals = replace(molecules, periodic=True)
    painn = resolve({"model": {"backbone": "painn", "features": 8, "interactions": 1, "radial": 4}})
    mace = resolve({"model": {"backbone": "mace"}})
    assert painn["uq"]["distance_metric"] == "auto"
    assert distance_metric(painn, crystals) == "nearest"
    assert distance_metric(painn, molecules) == "euclidean"
    assert distance_metric(mace, crystals) == "euclidean"
    explicit = resolve({"model": {"backbone": "painn"}}, ["uq.distance_metric=mahalanobis"])
    assert distance_metric(explicit, crystals) == "mahalanobis"
    built = build_potential(painn, crystals)
    assert built.inference.metric == "nearest"
    assert all(d.bank_size > 0 for d in built.inference.densities_list())
    assert build_potential(painn, molecules).inference.metric == "euclidean"


def test_the_training_summary_records_whether_every_structure_is_a_periodic_cell(acac_small):
    from dataclasses import replace

    from blip.data import read_labelled
    from blip.train.datasets import summarise

    silicon = read_labelled(EXAMPLES / "si" / "train.xyz")[:6]
    e0s = {1: 0.0, 6: 0.0, 8: 0.0, 14: 0.0}
    assert summarise(silicon, e0s, 3.0).periodic is True
    assert summarise(acac_small[:3], e0s, 3.0).periodic is False
    assert summarise(silicon + acac_small[:1], e0s, 3.0).periodic is False  # mixed: not crystals
    slab = silicon[0].atoms.copy()
    slab.pbc = (True, True, False)
    assert summarise([replace(silicon[0], atoms=slab)], e0s, 3.0).periodic is False  # a slab


def test_a_crystal_model_file_with_the_auto_metric_loads_with_its_nearest_rows(tmp_path):
    """The file keeps ``auto`` and the summary's periodicity: loading rebuilds the nearest-row rates
    and their bank, and the fixed-seed predictions are those of the saved model."""
    from dataclasses import replace

    from ase.build import bulk

    from blip.backbones.base import DatasetSummary
    from blip.build import build_potential
    from blip.io import load, save_model
    from blip.predictor import BlipModel

    cfg = resolve({"model": {"backbone": "painn", "cutoff": 4.0, "features": 8, "interactions": 1, "radial": 4}})
    summary = replace(DatasetSummary(elements=[14], e0s={14: -158.4}), periodic=True)
    torch.manual_seed(0)
    potential = build_potential(cfg, summary)
    cells = [bulk("Si", "diamond", a=5.43, cubic=True) for _ in range(2)]
    for seed, cell in enumerate(cells):
        cell.rattle(0.1, seed=seed)
    potential.fit_feature_statistics([collate([build_graph(c, 4.0) for c in cells], dtype=torch.float32)])
    model = BlipModel([potential], cfg, summary)
    save_model(model, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    assert loaded.config["uq"]["distance_metric"] == "auto" and loaded.summary.periodic is True
    assert loaded.members[0].inference.metric == "nearest"
    probe = cells[0].copy()
    probe.rattle(0.05, seed=9)
    before, after = model.predict([probe], samples=4, seed=1), loaded.predict([probe], samples=4, seed=1)
    np.testing.assert_allclose(after["forces_std"][0], before["forces_std"][0], rtol=1e-6)
    assert np.all(before["forces_std"][0] > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_distance_gradient_is_that_of_the_soft_minimum_to_second_order(dtype):
    """``soft_nearest`` has a hand-written gradient (the softmax weights of the forward pass pull the
    row towards their mean bank row): it equals autograd's gradient of the plain soft minimum, and
    under ``create_graph`` its own gradient is exact too (gradgradcheck), so forces from a model with
    the nearest-row distance are the derivative of its energy."""
    torch.manual_seed(0)
    bank = torch.randn(40, 6, dtype=torch.float64)
    rows = (0.8 * torch.randn(25, 6, dtype=torch.float64)).requires_grad_()
    scale = torch.tensor(1.0 / 6.0, dtype=torch.float64)

    def plain(r):
        m = scale * ((r[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
        return -0.05 * (torch.logsumexp(-m / 0.05, dim=1) - math.log(bank.shape[0]))

    assert torch.autograd.gradcheck(lambda r: soft_nearest(r, bank, scale, 0.05), (rows[:8],))
    assert torch.autograd.gradgradcheck(lambda r: soft_nearest(r, bank, scale, 0.05), (rows[:8],))
    x = rows.detach().to(dtype).requires_grad_()
    fast = soft_nearest(x, bank.to(dtype), scale.to(dtype), 0.05)
    weights = torch.rand(25, dtype=dtype)
    grad_fast = torch.autograd.grad((weights * fast).sum(), x)[0]
    y = rows.detach().requires_grad_()
    slow = plain(y)
    grad_slow = torch.autograd.grad((weights.double() * slow).sum(), y)[0]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fast.double(), slow.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_fast.double(), grad_slow, rtol=tol, atol=tol)
    with torch.no_grad():  # the path without a gradient gives the same values
        torch.testing.assert_close(soft_nearest(x, bank.to(dtype), scale.to(dtype), 0.05), fast.detach())
