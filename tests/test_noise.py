"""Counter-based sampling noise: a hash of what the noise acts on, not a position in a stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from scipy import stats

from blip.build import build_backbone
from blip.backbones.base import DatasetSummary
from blip.bayes.noise import (_GOLDEN, column_hashes, counter_normal, counter_normals, counter_uniform, hash_words,
                              mix32, mix32_int, positions_in_graph, row_keys, stream_word)
from blip.config import resolve
from blip.data import build_graph, collate
from blip.model import BayesianPotential
from conftest import DATA

SUMMARY = DatasetSummary(elements=[1, 6, 8], e0s={1: -13.6, 6: -1026.9, 8: -2037.8})
SMALL = {"painn": {"features": 8, "interactions": 2, "radial": 6},
         "mace": {"hidden_irreps": "4x0e + 4x1o", "correlation": 2, "num_interactions": 2, "num_radial": 4,
                  "max_ell": 1, "radial_mlp": [8], "mlp_irreps": "4x0e"}}


def _potential(backbone: str, cutoff: float = 3.0, **uq) -> BayesianPotential:
    """A tiny BLIP potential in float64 with noise on every layer type, radial ones included."""
    torch.manual_seed(0)
    cfg = resolve({"model": {"backbone": backbone, "cutoff": cutoff, "edge_noise": True, **SMALL[backbone]}})
    return BayesianPotential(build_backbone(cfg["model"], SUMMARY), **uq).double()


def _mix32_reference(x: np.ndarray) -> np.ndarray:
    """The same hash in numpy uint64, where overflow is defined behaviour."""
    m = np.uint64(0xFFFFFFFF)
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


def test_mix32_matches_unsigned_reference_even_where_int64_products_wrap():
    values = np.concatenate([[0, 1, 2 ** 31, 2 ** 32 - 1], np.random.default_rng(0).integers(0, 2 ** 32, 5000)])
    as_int32 = torch.as_tensor(values.astype(np.uint32).view(np.int32))
    ours = mix32(as_int32.clone()).numpy().view(np.uint32)
    np.testing.assert_array_equal(ours.astype(np.uint64), _mix32_reference(values))
    assert len(np.unique(ours)) == len(np.unique(values))  # a bijection on 32 bits


def _keys(n_rows: int, seed: int = 5, replica: int = 0, structure: int = 0) -> torch.Tensor:
    return row_keys(seed, torch.tensor([replica]), torch.tensor([structure]), torch.tensor([n_rows]),
                    torch.arange(n_rows)[:, None])


def _unsigned(x: torch.Tensor) -> np.ndarray:
    return x.numpy().view(np.uint32).astype(np.uint64)


def test_host_hash_of_the_seed_words_equals_folding_them_on_the_device():
    """row_keys folds the seed's two words on the host (Python ints, also inside TorchScript, whose ints
    are 64-bit): the keys must be those of folding all four words (seed low, seed high, replica,
    structure) on the device, for seeds beyond 32 bits too."""
    values = np.random.default_rng(2).integers(0, 2 ** 32, 3000)
    assert [mix32_int(int(v)) for v in values] == _mix32_reference(values).tolist()
    replica, structure, rows = torch.tensor([0, 3, 1]), torch.tensor([7, 2, 2 ** 40 + 9]), torch.tensor([2, 1, 3])
    ids = torch.tensor([[0, 5], [1, 6], [0, 2], [0, 1], [1, 1], [2, 9]])
    scripted = torch.jit.script(row_keys)
    for seed in (0, 5, 2 ** 31 + 3, 2 ** 32 - 1, 2 ** 45 + 77):
        words = torch.stack([torch.full_like(replica, seed & 0xFFFFFFFF), torch.full_like(replica, seed >> 32),
                             replica, structure], dim=1)
        graph = hash_words(torch.zeros(3, dtype=torch.int32), words)
        expected = hash_words(torch.repeat_interleave(graph, rows), ids)
        assert torch.equal(row_keys(seed, replica, structure, rows, ids), expected)
        assert torch.equal(scripted(seed, replica, structure, rows, ids), expected)


def test_mix32_with_a_scratch_tensor_equals_mix32_allocating():
    x = torch.as_tensor(np.random.default_rng(1).integers(0, 2 ** 32, (300, 7)).astype(np.uint32).view(np.int32))
    scratch = torch.full_like(x, 123)
    assert torch.equal(mix32(x.clone(), scratch), mix32(x.clone()))


def test_counter_normal_is_box_muller_of_the_reference_hash():
    """The in-place float64 draws equal Box-Muller written out in numpy on the unsigned hash."""
    keys, stream, channels = _keys(500), stream_word("edge", 2), 7
    pairs = (channels + 1) // 2
    m = np.uint64(0xFFFFFFFF)
    column = _mix32_reference((np.arange(pairs, dtype=np.uint64) * np.uint64(2) + np.uint64(stream & 0xFFFFFFFF)) & m)
    bits = _mix32_reference(_unsigned(keys)[:, None] ^ column[None, :])
    radius = np.sqrt(-2.0 * np.log((bits.astype(np.float64) + 0.5) * 2.0 ** -32))
    second = _mix32_reference(bits ^ np.uint64(_GOLDEN & 0xFFFFFFFF))
    angle = (second.astype(np.float64) + 0.5) * 2.0 ** -32 * 2.0 * np.pi
    expected = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :channels]
    np.testing.assert_allclose(counter_normal(keys, stream, channels, torch.float64).numpy(), expected,
                               rtol=1e-12, atol=1e-12)
    assert np.array_equal(column, _unsigned(column_hashes(stream, pairs, torch.device("cpu"))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drawing_several_layers_at_once_gives_each_its_own_numbers(dtype):
    layers = [(stream_word("node", slot), channels) for slot, channels in enumerate([64, 7, 1, 32, 2])]
    for rows in (1, 13, 300):
        for max_elements in (1, 2 ** 10, 2 ** 30):  # every layer alone, some groups, all at once
            together = counter_normals(_keys(rows), layers, dtype, max_elements)
            assert len(together) == len(layers)
            for (stream, channels), draws in zip(layers, together):
                assert torch.equal(draws, counter_normal(_keys(rows), stream, channels, dtype))


@pytest.mark.parametrize("backbone", ["painn", "mace"])
def test_noise_plan_learned_from_the_first_pass_leaves_samples_unchanged(backbone, monkeypatch):
    """Later passes draw each domain's numbers at once (the plan); the samples stay bit-identical."""
    import ase.io

    from blip.bayes import noise

    calls = []
    monkeypatch.setattr(noise, "counter_normal", lambda *a, **k: calls.append(1) or counter_normal(*a, **k))
    model = _potential(backbone, cutoff=4.0, p_init=0.2)
    frames = ase.io.read(DATA / "acac_small.xyz", ":2")
    batch = collate([build_graph(a, 4.0, index=i) for i, a in enumerate(frames)], torch.float64)
    assert not model.noise_state.plans
    first = model(batch, sample=True, seed=7)
    plan = model.noise_state.plans[model.noise_kind]
    layer_calls = len(calls)
    assert layer_calls == sum(len(layers) for layers in plan.values()) > len(plan)  # one call per noisy layer
    calls.clear()
    again = model(batch, sample=True, seed=7)
    assert len(calls) == len(plan)  # one call per domain
    for key in ("energy", "forces"):
        assert torch.equal(first[key], again[key]), key
    other = model(batch, sample=True, seed=8)
    assert not torch.allclose(first["forces"], other["forces"])



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counter_normals_are_standard_normal(dtype):
    z = counter_normal(_keys(4000), stream_word("node", 0), 64, dtype)  # 256k draws
    assert z.dtype == dtype and torch.isfinite(z).all()
    x = z.double().flatten().numpy()
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1) < 0.01  # standard errors 0.002 and 0.003
    assert stats.kstest(x, "norm").statistic < 0.005  # 1 % critical value 0.0032
    u = counter_uniform(_keys(4000), stream_word("node", 0), 64, dtype).double().flatten().numpy()
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").statistic < 0.005


def test_blocks_layers_and_channels_draw_uncorrelated_numbers():
    n, stream = 20000, stream_word("node", 0)
    base = counter_normal(_keys(n), stream, 2, torch.float64)
    others = {
        "other replica": counter_normal(_keys(n, replica=1), stream, 2, torch.float64)[:, 0],
        "other structure": counter_normal(_keys(n, structure=1), stream, 2, torch.float64)[:, 0],
        "other seed": counter_normal(_keys(n, seed=6), stream, 2, torch.float64)[:, 0],
        "other layer": counter_normal(_keys(n), stream_word("node", 1), 2, torch.float64)[:, 0],
        "other domain": counter_normal(_keys(n), stream_word("edge", 0), 2, torch.float64)[:, 0],
        "next channel": base[:, 1],
        "next row": torch.roll(base[:, 0], 1),
    }
    for name, other in others.items():
        r = float(torch.corrcoef(torch.stack([base[:, 0], other]))[0, 1])
        assert abs(r) < 4 / n ** 0.5, (name, r)  # 4 standard errors
        assert not torch.equal(base[:, 0], other), name


def test_row_keys_do_not_depend_on_batch_position():
    counts = torch.tensor([3, 4, 2])
    ids = positions_in_graph(counts)[:, None]
    assert ids.flatten().tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    batched = row_keys(1, torch.tensor([0, 2, 0]), torch.tensor([8, 5, 5]), counts, ids)
    alone = row_keys(1, torch.tensor([2]), torch.tensor([5]), torch.tensor([4]), torch.arange(4)[:, None])
    assert torch.equal(batched[3:7], alone)
    assert len(set(batched.tolist())) == 9


def _molecule_leaving_cutoff(distance: float) -> Atoms:
    """Four atoms; the last moves away along x so that its edges cross a 3 A cutoff."""
    return Atoms("CHHO", positions=[[0, 0, 0], [1.1, 0, 0], [-0.4, 1.0, 0], [distance, 0.3, 0.2]])


@pytest.mark.parametrize("backbone", ["painn", "mace"])
def test_fixed_seed_sample_stays_smooth_when_an_edge_leaves_the_neighbour_list(backbone):
    """The sample's energy along the path jumps no more than the noise-free energy does."""
    model = _potential(backbone, p_init=0.3)
    grid = np.linspace(2.7, 3.3, 121)  # the O-C edge leaves at 3.0 A, O-H ones near it
    graphs = [build_graph(_molecule_leaving_cutoff(x), 3.0, index=0) for x in grid]
    assert len({g["edge_index"].shape[1] for g in graphs}) > 1
    energies = {}
    for mode in ("map", "sample"):
        e = [float(model(collate([g], torch.float64), sample=mode == "sample", seed=3, forces=False)["energy"].detach())
             for g in graphs]
        energies[mode] = np.array(e)
    assert np.abs(energies["sample"] - energies["map"]).max() > 1e-4  # the noise is there
    jumps = {m: np.abs(np.diff(e)).max() for m, e in energies.items()}
    assert jumps["sample"] < 3 * jumps["map"] + 1e-6, jumps


@pytest.mark.parametrize("backbone", ["painn", "mace", "chgnet"])
def test_row_identities_are_unique_within_each_structure(backbone):
    """The noise key of a row is its identity: two rows of a structure must never share one."""
    import ase.io
    from ase.build import bulk

    if backbone == "chgnet":
        from blip.backbones.chgnet import NOISE_DOMAINS, CHGNetBackbone, load_chgnet

        si = bulk("Si", "diamond", a=5.43, cubic=True)
        si.rattle(0.05, seed=0)
        frames = [si, bulk("Si", "diamond", a=5.43)]
        potential = BayesianPotential(CHGNetBackbone(load_chgnet("0.3.0", pretrained=False, cutoff=6.0),
                                                     DatasetSummary(elements=[14]), noise_domains=NOISE_DOMAINS))
    else:
        frames = ase.io.read(DATA / "acac_small.xyz", ":2")
        potential = _potential(backbone, cutoff=4.0)
    cutoff = float(potential.backbone.cutoff)
    batch = potential.backbone.prepare(collate([build_graph(a, cutoff, index=i) for i, a in enumerate(frames)]))
    feats = potential.backbone.domain_features(batch)
    ids = potential.backbone.domain_row_ids(batch, feats)
    assert set(potential.layers) <= set(ids)
    for domain, (_, counts) in feats.items():
        graph = torch.repeat_interleave(torch.arange(len(counts)), counts)
        rows = torch.cat([graph[:, None], ids[domain]], dim=1)
        assert ids[domain].shape[0] == int(counts.sum())
        assert torch.unique(rows, dim=0).shape[0] == rows.shape[0], domain
