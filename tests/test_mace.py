"""BLIP on MACE (mace-torch): irreps-safe noise, exact equivariance of every sample, MAP == mace-torch."""

import copy

import ase.io
import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.transform import Rotation

import blip
from blip.backbones import mace as blip_mace  # imports mace-torch before e3nn (see the module)
from blip.backbones.base import DatasetSummary
from blip.bayes import NoiseContext, NoiseState
from blip.bayes.noise import row_keys
from blip.bayes.irreps import NoisyFCLayer, NoisyIrrepsLinear, irreps_channel_index
from blip.build import build_backbone
from blip.cli import main
from blip.config import resolve
from blip.data import build_graph, collate, replicate
from blip.errors import ConfigError
from blip.model import BayesianPotential
from conftest import DATA, pulled_out

from e3nn import o3  # noqa: E402  (after mace, which e3nn 0.4.4 needs under torch >= 2.6)
from e3nn.nn import FullyConnectedNet  # noqa: E402

CUTOFF = 4.0
TINY = {"backbone": "mace", "cutoff": CUTOFF, "dtype": "float64", "hidden_irreps": "8x0e + 8x1o",
        "correlation": 2, "num_interactions": 2, "num_radial": 4, "max_ell": 2, "radial_mlp": [8, 8],
        "mlp_irreps": "4x0e"}


def _model_cfg(**changes):
    return resolve({"model": {**TINY, **changes}})["model"]


def _backbone(summary, **changes):
    torch.manual_seed(0)
    return build_backbone(_model_cfg(**changes), summary)


def _potential(summary, method="blip"):
    """With noise on the radial MLPs too (``edge_noise``), so both noisy layer types are tested."""
    model = BayesianPotential(_backbone(summary, edge_noise=True), method=method, p_init=0.2,
                              dropout_p=0.3).double()
    if model.inference is not None:  # rates that vary between rows
        for head in model.inference.heads_list():
            torch.nn.init.normal_(head.net[2].weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def blip_mace_model(acac_summary):
    return _potential(acac_summary)


def _batch(atoms_list):
    return collate([build_graph(a, CUTOFF, index=i) for i, a in enumerate(atoms_list)], dtype=torch.float64)


def _run(model, atoms_list, sample, seed=11):
    out = model(_batch(atoms_list), sample=sample, seed=seed if sample else None)
    return out["energy"].detach().numpy(), out["forces"].detach().numpy()


# ---------------------------------------------------------------- which layers are noisy


def test_noisy_layers_are_messages_and_updates_readouts_stay_deterministic(blip_mace_model):
    layers = blip_mace_model.layers
    assert layers["node"] == ["model.interactions.0.linear",
                              "model.interactions.1.linear_up", "model.interactions.1.linear",
                              "model.products.0.linear", "model.products.1.linear"]
    assert layers["edge"] == [f"model.interactions.{n}.conv_tp_weights.layer{k}" for n in (0, 1) for k in (0, 1, 2)]
    modules = dict(blip_mace_model.backbone.named_modules())
    assert all(isinstance(modules[n], NoisyIrrepsLinear) for n in layers["node"])
    assert all(isinstance(modules[n], NoisyFCLayer) for n in layers["edge"])
    assert type(modules["model.readouts.0.linear"]) is o3.Linear
    assert blip_mace_model.inference.heads["edge"]["0"].net[0].in_features == 4 + 2 * 3 + 4


def test_radial_mlps_are_deterministic_by_default(acac_summary):
    layers = BayesianPotential(_backbone(acac_summary), method="blip").layers
    assert set(layers) == {"node"} and len(layers["node"]) == 5


# ---------------------------------------------------------------- samples (physics: tests/test_physics.py)


def test_samples_are_reproducible_and_differ_between_seeds(blip_mace_model, acac_small):
    atoms = [acac_small[4].atoms]
    # TorchScript's profiling executor re-optimises e3nn's scripted code after its first runs, which
    # can change a force's float64 rounding (1.7e-18 eV/A seen): compare passes after that
    for _ in range(2):
        _run(blip_mace_model, atoms, True, seed=3)
    e1, f1 = _run(blip_mace_model, atoms, True, seed=1)
    e1b, f1b = _run(blip_mace_model, atoms, True, seed=1)
    e2, _ = _run(blip_mace_model, atoms, True, seed=2)
    assert np.array_equal(e1, e1b) and np.array_equal(f1, f1b)
    assert abs(e1[0] - e2[0]) > 1e-5


@pytest.mark.parametrize("method", ["blip", "mc_dropout"])
def test_graphs_flagged_noise_free_in_a_sampled_pass_give_the_map_pass(acac_summary, acac_small, method):
    """``batch["noise_free"]`` (the noise-free replica a GPU predict adds to its sampled pass): with
    noise on node and edge layers, the flagged graphs' energies and forces are the MAP pass's; the
    other graphs' are the samples they would be without the flag."""
    model = _potential(acac_summary, method)
    batch = replicate(_batch([s.atoms for s in acac_small[:2]]), 3)
    plain = model(batch, sample=True, seed=5)
    flagged = model(dict(batch, noise_free=batch["replica"] == 2), sample=True, seed=5)
    map_pass = model(_batch([s.atoms for s in acac_small[:2]]))
    n = map_pass["forces"].shape[0]
    torch.testing.assert_close(flagged["energy"][4:], map_pass["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(flagged["forces"][2 * n:], map_pass["forces"], rtol=0, atol=1e-10)
    torch.testing.assert_close(flagged["energy"][:4], plain["energy"][:4], rtol=0, atol=1e-10)
    torch.testing.assert_close(flagged["forces"][:2 * n], plain["forces"][:2 * n], rtol=0, atol=1e-10)
    assert not torch.allclose(plain["energy"][4:], map_pass["energy"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- noise off == mace-torch


def test_wrapped_model_without_noise_equals_unwrapped_mace(acac_summary, acac_small):
    backbone = _backbone(acac_summary)
    plain = copy.deepcopy(backbone)
    wrapped = BayesianPotential(backbone, method="blip").double()
    batch = _batch([s.atoms for s in acac_small])
    out = wrapped(batch)
    plain_energy = plain.model(plain.mace_inputs(batch), compute_force=False)["energy"]
    assert torch.equal(out["energy"].detach(), plain_energy.detach())
    # the wrap keeps parameter names: the unwrapped state dict loads as is
    assert set(plain.state_dict()) == set(backbone.state_dict())
    backbone.load_state_dict(plain.state_dict())


def test_species_shift_adds_a_learned_energy_per_species_inside_the_isolation_switch(acac_summary, acac_small):
    """E(shift) - E(0) = sum over atoms of shift[species] x switch, the shift gets exactly that
    gradient, and a lone atom keeps its isolated-atom energy whatever the shift."""
    from blip.backbones.base import isolation_switch, edge_vectors

    backbone = _backbone(acac_summary)
    assert backbone.species_shift is not None and not backbone.species_shift.any()  # on by default, starts at 0
    lone = ase.Atoms("O", positions=[[0.0, 0.0, 0.0]])
    pulled = pulled_out(acac_small[0].atoms, 9, 2.5)  # an H whose switch is inside (0, 1)
    batch = _batch([s.atoms for s in acac_small[:2]] + [pulled, lone])
    before = backbone.energy(dict(batch)).detach()
    shift = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)  # H, C, O
    with torch.no_grad():
        backbone.species_shift.copy_(shift)
    after = backbone.energy(dict(batch))
    after.sum().backward()
    switch = isolation_switch(torch.linalg.norm(edge_vectors(batch), dim=1), batch["edge_index"][1],
                              batch["numbers"].shape[0], CUTOFF)
    assert 0.05 < float(switch[batch["batch"] == 2].min()) < 0.95  # the pulled-out H is half switched off
    species = backbone.species.index(batch["numbers"])
    expected = torch.zeros_like(before).index_add(0, batch["batch"], shift[species] * switch)
    torch.testing.assert_close(after.detach() - before, expected, rtol=0, atol=1e-9)
    assert float(after.detach()[3]) == pytest.approx(acac_summary.e0s[8], abs=1e-12)  # the lone O: its E0
    torch.testing.assert_close(backbone.species_shift.grad, torch.zeros(3, dtype=torch.float64).index_add(0, species, switch))


def test_species_shift_is_off_for_files_written_before_it_and_can_be_turned_off(acac_summary):
    from blip.io import _with_new_keys

    assert _with_new_keys({"model": {"backbone": "mace"}, "uq": {}})["model"]["species_shift"] is False
    assert "species_shift" not in _with_new_keys({"model": {"backbone": "painn"}, "uq": {}})["model"]
    assert _backbone(acac_summary, species_shift=False).species_shift is None
    with pytest.raises(ConfigError, match="model.species_shift"):
        resolve({"model": {**TINY, "species_shift": "yes"}})


def _mace_own_batch(atoms_list, elements):
    """mace-torch's own data pipeline (neighbour list, one-hot, shifts), float64."""
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable, torch_geometric

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        table = AtomicNumberTable(elements)
        graphs = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=table, cutoff=CUTOFF)
                  for a in atoms_list]
        return torch_geometric.Batch.from_data_list(graphs).to_dict()
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("system", ["acac", "si"])
def test_map_energy_and_forces_equal_mace_torch_on_its_own_inputs(acac_small, system):
    """Checks our edge convention, shifts (periodic Si), one-hot, E0s against mace-torch's pipeline."""
    if system == "acac":
        atoms_list = [s.atoms for s in acac_small[:3]]
        summary = DatasetSummary([1, 6, 8], {1: -13.6, 6: -1026.9, 8: -2037.8}, -1.3, 0.7, 9.0)
    else:
        atoms_list = ase.io.read(DATA / "si_small.xyz", ":2")
        summary = DatasetSummary([14], {14: -160.0}, -5.4, 0.4, 30.0)
    backbone = _backbone(summary)
    reference = copy.deepcopy(backbone.model)
    wrapped = BayesianPotential(backbone, method="blip").double()
    ours = wrapped(_batch(atoms_list))
    theirs = reference(_mace_own_batch(atoms_list, summary.elements), compute_force=True)
    np.testing.assert_allclose(ours["energy"].detach(), theirs["energy"].detach(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours["forces"].detach(), theirs["forces"].detach(), rtol=0, atol=1e-9)
    e0 = sum(summary.e0s[int(z)] for z in atoms_list[0].numbers)
    assert abs(float(ours["energy"][0].detach()) - e0) < 0.1 * abs(e0)  # E0s are part of the energy


# ---------------------------------------------------------------- the noisy layers alone


def _context(domain, rows, kind, seed=3):
    gen = torch.Generator().manual_seed(seed)
    rates = {domain: torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.1}
    keys = {domain: row_keys(seed, torch.tensor([0]), torch.tensor([0]), torch.tensor([rows]), torch.arange(rows)[:, None])}
    return NoiseContext.fixed(rates, keys, kind)


@pytest.mark.parametrize("kind", ["gaussian", "bernoulli"])
def test_noisy_irreps_linear_is_exact_at_map_and_equivariant_per_sample(kind):
    torch.manual_seed(0)
    irreps_in, irreps_out = o3.Irreps("3x0e + 2x1o + 2x2e"), o3.Irreps("2x0e + 3x1o + 1x2e")
    linear = o3.Linear(irreps_in, irreps_out).double()
    state = NoiseState()
    noisy = NoisyIrrepsLinear(linear, "node", 0, state)
    x = torch.randn(6, irreps_in.dim, dtype=torch.float64)
    assert torch.equal(noisy(x), linear(x))
    rot = torch.as_tensor(Rotation.random(random_state=2).as_matrix())
    d_in, d_out = irreps_in.D_from_matrix(rot), irreps_out.D_from_matrix(rot)
    with state.use(_context("node", 6, kind)):
        y = noisy(x)
    with state.use(_context("node", 6, kind)):
        y_rot = noisy(x @ d_in.T)
    torch.testing.assert_close(y_rot, y @ d_out.T, rtol=0, atol=1e-12)
    assert (y - linear(x)).abs().max() > 1e-3
    # one factor per (row, channel, irrep): the 2l+1 components of a block are scaled alike
    assert irreps_channel_index(irreps_in).tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4] + [5] * 5 + [6] * 5


def test_noisy_fc_layer_is_exact_at_map_and_has_local_reparameterisation_variance():
    torch.manual_seed(0)
    net = FullyConnectedNet([5, 7, 3], torch.nn.functional.silu).double()
    state = NoiseState()
    hidden, last = (NoisyFCLayer(net.layer0, "edge", 0, state), NoisyFCLayer(net.layer1, "edge", 1, state))
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(last(hidden(x)), net(x))
    rows = 40000
    xs = hidden(x)[:1].detach().expand(rows, 7).contiguous()
    ctx = NoiseContext.fixed({"edge": torch.full((rows, 2), 0.2, dtype=torch.float64)})
    with state.use(ctx):
        y = last(xs)
    w = net.layer1.weight.detach() / 7 ** 0.5
    expected_var = 0.25 * (xs[0] ** 2) @ (w ** 2)  # alpha = p / (1 - p) = 0.25
    torch.testing.assert_close(y.mean(0), xs[0] @ w, rtol=0, atol=0.03)
    torch.testing.assert_close(y.var(0), expected_var, rtol=0.05, atol=1e-3)


def test_independent_noise_on_the_scalar_path_has_the_variance_of_independent_weight_noise():
    """Kind "gaussian": every 0e -> 0e weight takes its own noise (variance alpha w^2 per weight),
    the 1o channels one factor per input channel, as with the other kinds."""
    torch.manual_seed(0)
    linear = o3.Linear(o3.Irreps("3x0e + 2x1o"), o3.Irreps("2x0e + 1x1o")).double()
    state = NoiseState()
    noisy = NoisyIrrepsLinear(linear, "node", 0, state)
    rows = 40000
    x = torch.randn(1, linear.irreps_in.dim, dtype=torch.float64).expand(rows, -1).contiguous()
    keys = {"node": row_keys(4, torch.tensor([0]), torch.tensor([0]), torch.tensor([rows]),
                             torch.arange(rows)[:, None])}
    with state.use(NoiseContext.fixed({"node": torch.full((rows, 1), 0.2, dtype=torch.float64)}, keys, "gaussian")):
        y = noisy(x)
    path_weight = 3 ** -0.5  # e3nn's normalisation of a path with 3 input channels
    w_scalar = linear.weight.detach()[:6].view(3, 2) * path_weight
    expected_var = 0.25 * (x[0, :3] ** 2) @ (w_scalar ** 2)  # alpha = p / (1 - p) = 0.25
    torch.testing.assert_close(y.mean(0), linear(x[:1])[0], rtol=0, atol=0.03)
    torch.testing.assert_close(y[:, :2].var(0), expected_var, rtol=0.05, atol=1e-3)
    # the 1o outputs: input channel factors, the same variance as Gaussian dropout of the inputs
    with state.use(NoiseContext.fixed({"node": torch.full((rows, 1), 0.2, dtype=torch.float64)}, keys,
                                      "gaussian_inputs")):
        y_inputs = noisy(x)
    torch.testing.assert_close(y[:, 2:].var(0), y_inputs[:, 2:].var(0), rtol=0.05, atol=1e-3)
    # what tells them apart: the 0e outputs' covariance (independent weights: none; shared per input: alpha
    # sum_c w_0c w_1c x_c^2)
    shared_cov = 0.25 * (x[0, :3] ** 2 * w_scalar[:, 0] * w_scalar[:, 1]).sum()
    assert abs(shared_cov) > 0.005  # the estimates below have a standard error of about 6e-4
    assert abs(torch.cov(y[:, :2].T)[0, 1]) < 0.002
    torch.testing.assert_close(torch.cov(y_inputs[:, :2].T)[0, 1], shared_cov, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- config and CLI


BAD_SETTINGS = [("hidden_irreps", "8x0e + banana"), ("hidden_irreps", "8x1o"), ("hidden_irreps", "8x0e + 4x1o"),
                ("mlp_irreps", "4x1o"), ("radial_mlp", [8, -1]), ("correlation", 0)]


@pytest.mark.parametrize("key, value", BAD_SETTINGS)
def test_bad_mace_settings_name_the_key_when_the_config_is_resolved(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        _model_cfg(**{key: value})


def test_bad_irreps_through_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_file": str(DATA / "acac_small.xyz")},
                                    "model": {"backbone": "mace", "hidden_irreps": "16x0e + 16x1q"},
                                    "output_dir": str(tmp_path / "out")}))
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blip: error: model.hidden_irreps: invalid irreps '16x0e + 16x1q'") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_mace_key_is_a_config_error():
    with pytest.raises(ConfigError, match="model.hidden_irrep"):
        resolve({"model": {"backbone": "mace", "hidden_irrep": "8x0e"}})


def test_cli_train_one_epoch_then_predict_with_spread(tmp_path):
    config = {
        "data": {"train_file": str(DATA / "acac_small.xyz"), "valid_fraction": 0.2,
                 "e0s": str(DATA / "acac_isolated_atoms.xyz")},
        "model": {k: v for k, v in TINY.items() if k != "dtype"},
        "uq": {"samples": 4},
        "training": {"epochs": 1, "batch_size": 2, "seed": 0},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "mace.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--quiet"]) == 0
    model = blip.load(tmp_path / "out" / "model.pt")
    assert isinstance(model.members[0].backbone, blip_mace.MaceBackbone)
    atoms = ase.io.read(DATA / "acac_small.xyz", ":2")
    out = model.predict(atoms, samples=4, seed=0)
    assert np.all(out["energy_std"] > 0)
    assert all(np.all(f > 0) for f in out["forces_std"])
    assert np.all(np.isfinite(out["energy"]))


@pytest.mark.parametrize("backbone, periodic, expected, noise_kind", [
    ("mace", True, (0.05, 0.3), "gaussian"), ("mace", False, None, "gaussian_inputs"),
    ("painn", True, None, "gaussian_inputs")])
def test_crystal_defaults_are_on_for_mace_trained_on_crystals_only(lj_si_files, tmp_path, backbone, periodic,
                                                                   expected, noise_kind):
    """``uq.contrastive.remove: auto`` and ``uq.weight_noise: auto`` (the defaults): for MACE trained on
    periodic structures, copies that lose 5-30 % of their atoms and independent weight noise; for
    molecules or other backbones, no removal and noise per input channel; what the trainer uses.
    ``uq.distance_slope: auto``: the rate heads start with slope 2 for PaiNN, 1 for MACE."""
    from blip.build import contrastive_removal, distance_slope, weight_noise
    from blip.config import DEFAULTS
    from blip.train.datasets import prepare_data
    from blip.train.loop import Trainer

    assert DEFAULTS["uq"]["contrastive"]["remove"] == DEFAULTS["uq"]["weight_noise"] == "auto"
    model = dict(TINY) if backbone == "mace" else {"backbone": "painn", "cutoff": CUTOFF, "dtype": "float64"}
    if periodic:
        data = {"train_file": str(lj_si_files / "train.xyz"), "valid_fraction": 0.25, "e0s": {14: 0.0}}
    else:
        data = {"train_file": str(DATA / "acac_small.xyz"), "valid_fraction": 0.25,
                "e0s": str(DATA / "acac_isolated_atoms.xyz")}
    cfg = resolve({"model": model, "data": data, "output_dir": str(tmp_path)})
    prepared = prepare_data(cfg)
    assert prepared.summary.periodic == periodic
    trainer = Trainer(cfg, progress=False)
    member, _, _ = trainer._new_member(prepared, 0)
    assert trainer.removal == expected == contrastive_removal(cfg, prepared.summary)
    assert member.noise_kind == noise_kind
    slope = 2.0 if backbone == "painn" else 1.0
    assert distance_slope(cfg) == slope
    assert all(float(torch.nn.functional.softplus(head.slope.detach())) == pytest.approx(slope, rel=1e-6)
               for head in member.inference.heads_list())
    # a value given wins over auto, null included
    for given, wanted in (([0.1, 0.2], (0.1, 0.2)), (None, None)):
        chosen = resolve({"model": model, "data": data, "uq": {"contrastive": {"remove": given}}})
        assert contrastive_removal(chosen, prepared.summary) == wanted
    for given in ("per_input", "independent"):
        assert weight_noise(resolve({"model": model, "data": data, "uq": {"weight_noise": given}}),
                            prepared.summary) == given
    assert distance_slope(resolve({"model": model, "data": data, "uq": {"distance_slope": 3}})) == 3.0
    with pytest.raises(ConfigError, match="contrastive.remove"):
        resolve({"model": model, "uq": {"contrastive": {"remove": "always"}}})
    for wrong in ("steep", 0, -1.0, True):
        with pytest.raises(ConfigError, match="distance_slope"):
            resolve({"model": model, "uq": {"distance_slope": wrong}})
