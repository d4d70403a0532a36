"""The BLIP core: KL, noisy layers, wrap, noise reproducibility."""

import math

import pytest
import torch
from torch import nn

from blip.bayes import InferenceNet, NoiseContext, NoiseState, NoisyLinear, kl_divergence, wrap
from blip.bayes.layers import NoisyVectorLinear, VectorLinear
from blip.bayes.noise import positions_in_graph, row_keys


def test_kl_zero_at_prior_and_positive_elsewhere():
    prior = 0.3
    at_prior = {"node": torch.full((7, 3), prior)}
    assert float(kl_divergence(at_prior, prior)) == pytest.approx(0.0, abs=1e-7)
    for p in (0.01, 0.1, 0.5, 0.8):
        assert float(kl_divergence({"node": torch.full((4, 2), p)}, prior)) > 0


def test_kl_matches_design_formula_up_to_constant():
    """DESIGN.md: 0.5*((a+1)/a0 + log a0 - log a - 1); ours subtracts 0.5/a0."""
    p, p0 = torch.tensor([[0.05, 0.2]]), 0.5
    a, a0 = p / (1 - p), p0 / (1 - p0)
    design = 0.5 * ((a + 1) / a0 + math.log(a0) - torch.log(a) - 1)
    assert float(kl_divergence({"e": p}, p0)) == pytest.approx(float(design.mean() - 0.5 / a0), rel=1e-6)


def test_kl_averages_layers_not_rows():
    """A domain with many rows must not outweigh one with few: mean per layer, then over layers."""
    rates = {"node": torch.full((2, 1), 0.1), "edge": torch.full((50, 1), 0.5)}
    single = float(kl_divergence({"n": torch.full((1, 1), 0.1)}, 0.5))
    assert float(kl_divergence(rates, 0.5)) == pytest.approx(single / 2, rel=1e-6)


def test_kl_sums_of_layers_grouped_by_domain_equal_layer_by_layer():
    """kl_sums sums the layers of one domain in one batch of kernels: the per-layer sums, rates and
    rows (what training all-reduces) equal those of each layer alone, in the order of the layers."""
    from blip.bayes.inference import kl_sums

    g = torch.Generator().manual_seed(0)
    rates = {("node", 0): torch.rand(6, generator=g) * 0.2 + 1e-3, ("edge", 0): torch.rand(9, generator=g) * 0.5,
             ("node", 1): torch.rand(6, generator=g) * 0.01 + 1e-4, ("node", 2): torch.rand(6, 2, generator=g) * 0.3}
    sums = kl_sums(rates, 0.01)
    assert [s.rows for s in sums] == [6, 9]
    node = [k for k in rates if k[0] == "node"]
    alone = [kl_sums({k: rates[k]}, 0.01)[0] for k in node]
    torch.testing.assert_close(sums[0].kl, torch.cat([a.kl for a in alone]))
    torch.testing.assert_close(sums[0].rate, torch.cat([(r if r.dim() == 2 else r[:, None]).sum(0) for r in
                                                        (rates[k] for k in node)]))
    a0 = 0.01 / 0.99
    alpha = rates[("edge", 0)] / (1 - rates[("edge", 0)])
    torch.testing.assert_close(sums[1].kl, (0.5 * (alpha / a0 - 1 - torch.log(alpha / a0))).sum()[None])


def _ctx(p, rows, kind="gaussian"):
    return NoiseContext.fixed({"node": torch.full((rows, 1), p, dtype=torch.float64)}, kind=kind)


def test_noisy_linear_map_is_exact_and_noise_has_local_reparameterisation_variance():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    state = NoiseState()
    noisy = NoisyLinear(lin, "node", 0, state)
    h = torch.randn(1, 5, dtype=torch.float64).repeat(20000, 1)
    assert torch.equal(noisy(h), lin(h))
    p = 0.2
    alpha = p / (1 - p)
    with state.use(_ctx(p, h.shape[0])):
        y = noisy(h)
    expected_var = alpha * (h[0] ** 2) @ (lin.weight ** 2).T
    assert torch.allclose(y.mean(0), lin(h[:1])[0], atol=0.02)
    assert torch.allclose(y.var(0), expected_var, rtol=0.05)


def test_bernoulli_kind_drops_inputs_with_rate_p():
    """With an identity weight the output is the dropout mask / (1 - p) itself."""
    lin = nn.Linear(4, 4, bias=False).double()
    lin.weight.data.copy_(torch.eye(4, dtype=torch.float64))
    state = NoiseState()
    noisy = NoisyLinear(lin, "node", 0, state)
    h = torch.ones(50000, 4, dtype=torch.float64)
    with state.use(_ctx(0.25, h.shape[0], kind="bernoulli")), torch.no_grad():
        y = noisy(h)
    kept = y * 0.75
    assert torch.all((kept == 0) | (kept == 1))  # dropped, or kept and rescaled by 1 / (1 - p)
    assert float(kept.mean()) == pytest.approx(0.75, abs=0.006)  # 200k draws: 3 standard errors
    assert float(y.mean()) == pytest.approx(1.0, abs=0.008)  # inverted dropout keeps the mean
    corr = torch.corrcoef(kept.T)[0, 1:]
    assert corr.abs().max() < 0.02  # channels are dropped independently


def test_noisy_vector_linear_is_exact_at_map_and_each_sample_rotates_with_its_input():
    """One factor per (row, channel) shared by x, y, z: a sample commutes with any rotation."""
    torch.manual_seed(0)
    lin = VectorLinear(6, 4, bias=False).double()
    state = NoiseState()
    noisy = NoisyVectorLinear(lin, "node", 0, state)
    v = torch.randn(30, 3, 6, dtype=torch.float64)
    assert torch.equal(noisy(v), lin(v))
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # a random orthogonal matrix
    keys = {"node": row_keys(7, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                             torch.tensor([30]), positions_in_graph(torch.tensor([30]))[:, None])}
    rates = {"node": torch.full((30, 1), 0.3, dtype=torch.float64)}
    with state.use(NoiseContext.fixed(rates, keys)):
        y = noisy(v)
    with state.use(NoiseContext.fixed(rates, keys)):
        y_rot = noisy(torch.einsum("ij,njc->nic", q, v))
    assert (y - lin(v)).abs().max() > 0.1  # the sample is noisy
    torch.testing.assert_close(y_rot, torch.einsum("ij,njc->nic", q, y), atol=1e-12, rtol=0)


def test_noisy_vector_linear_noise_has_the_variance_of_its_rate():
    """With an identity weight each output channel is its input times 1 + sqrt(alpha) xi."""
    torch.manual_seed(0)
    lin = VectorLinear(4, 4, bias=False).double()
    lin.weight.data.copy_(torch.eye(4, dtype=torch.float64))
    state = NoiseState()
    noisy = NoisyVectorLinear(lin, "node", 0, state)
    v = torch.ones(40000, 3, 4, dtype=torch.float64)
    with state.use(_ctx(0.2, v.shape[0])), torch.no_grad():
        factor = noisy(v)
    assert torch.equal(factor[:, 0], factor[:, 2])  # the same factor for every Cartesian component
    assert float(factor.mean()) == pytest.approx(1.0, abs=0.005)
    assert float(factor[:, 0].var()) == pytest.approx(0.2 / 0.8, rel=0.03)


def test_counter_noise_of_a_structure_does_not_depend_on_batch_neighbours():
    lin = nn.Linear(3, 2).double()
    state = NoiseState()
    noisy = NoisyLinear(lin, "node", 0, state)
    h = torch.randn(5, 3, dtype=torch.float64)
    rates = torch.full((5, 1), 0.3, dtype=torch.float64)
    counts = torch.tensor([2, 3])
    both_keys = row_keys(11, torch.tensor([0, 0]), torch.tensor([7, 9]), counts, positions_in_graph(counts)[:, None])
    alone_keys = row_keys(11, torch.tensor([0]), torch.tensor([9]), counts[1:], torch.arange(3)[:, None])
    with state.use(NoiseContext.fixed({"node": rates}, {"node": both_keys})):
        both = noisy(h)
    with state.use(NoiseContext.fixed({"node": rates[2:]}, {"node": alone_keys})):
        second = noisy(h[2:])
    # equal up to the matmul's rounding, which may depend on the number of rows (BLAS blocking);
    # another structure's keys would change the noise by O(1)
    torch.testing.assert_close(both[2:], second, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(both, lin(h))


def test_wrap_selects_by_pattern_and_keeps_state_dict_names():
    model = nn.Sequential(nn.Linear(2, 4), nn.SiLU(), nn.Linear(4, 1))
    keys = set(model.state_dict())
    layers = wrap(model, {r"0": "node", r"2": "edge"}, NoiseState())
    assert layers == {"node": ["0"], "edge": ["2"]}
    assert isinstance(model[0], NoisyLinear) and isinstance(model[2], NoisyLinear)
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="matched no"):
        wrap(nn.Sequential(nn.Linear(2, 2)), {r"nothing\.here": "node"}, NoiseState())


def test_inference_net_starts_at_p_init_and_respects_bounds():
    torch.manual_seed(0)
    base, groups = torch.randn(10, 3), torch.randint(0, 2, (10,))
    for use_hidden in (False, True):
        net = InferenceNet({"node": 3}, {"node": {0: 4, 1: 5}}, {"node": 2}, p_min=1e-5, p_max=0.1, p_init=5e-5,
                           use_hidden=use_hidden, distance=False)
        for slot, width in enumerate((4, 5)):
            p = net.rate("node", slot, base, torch.randn(10, width), groups)
            assert p.shape == (10,)
            assert torch.allclose(p, torch.full_like(p, 5e-5), rtol=0.05)
        with torch.no_grad():
            net.heads["node"]["1"].net[2].bias.fill_(10.0)
        assert float(net.rate("node", 1, base, torch.randn(10, 5), groups).max().detach()) == pytest.approx(0.1)
