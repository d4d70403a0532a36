"""BLIP on pretrained CHGNet 0.3.0: MAP equals CHGNet, conservative samples, reproducible noise."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml

from blip import config
from blip.backbones.base import DatasetSummary
from blip.backbones.chgnet import NOISE_DOMAINS, CHGNetBackbone, load_chgnet
from blip.build import build_potential
from blip.cli import main
from blip.data import build_graph, collate, read_labelled, replicate
from blip.errors import ConfigError, DataError
from blip.model import BayesianPotential
from conftest import rattled_si_cells

DATA = Path(__file__).parent / "data"
SI = DatasetSummary(elements=[14])


@pytest.fixture(scope="module")
def si():
    """3 periodic Si structures (63 atoms) with energies and forces."""
    return read_labelled(DATA / "si_small.xyz")


@pytest.fixture(scope="module")
def rattled():
    """Two small periodic Si cells (8 atoms, rattled): fast for many passes."""
    return rattled_si_cells()


@pytest.fixture(scope="module")
def pretrained():
    return load_chgnet("0.3.0", pretrained=True, cutoff=6.0)


def wrapped(chgnet, dtype=torch.float64, p=None, method="blip"):
    """BLIP around a copy of ``chgnet`` with noise on every domain; with ``p``, input-dependent rates near p."""
    model = BayesianPotential(CHGNetBackbone(copy.deepcopy(chgnet), SI, noise_domains=NOISE_DOMAINS),
                              method=method, prior_p=0.01,
                              p_min=1e-5, p_max=0.1, p_init=5e-5).to(dtype)
    if p is not None:
        torch.manual_seed(0)
        for head in model.inference.heads_list():
            torch.nn.init.normal_(head.net[2].weight, std=0.3)
            torch.nn.init.constant_(head.net[2].bias, math.log(p / (1 - p)) - head.logit0)
    return model


def batch_of(atoms_list, dtype=torch.float64, first_index=0):
    graphs = [build_graph(a, 6.0, index=first_index + i) for i, a in enumerate(atoms_list)]
    return collate(graphs, dtype=dtype)


def chgnet_reference(chgnet, atoms_list, dtype):
    """CHGNet's own forward on its own graphs, positions exactly as given: energies (eV), forces."""
    from chgnet.graph import CrystalGraph
    from pymatgen.io.ase import AseAtomsAdaptor

    graphs = []
    for a in atoms_list:
        g = chgnet.graph_converter(AseAtomsAdaptor.get_structure(a)).to_dict()
        frac = np.linalg.solve(a.cell.array.T, a.positions.T).T
        assert np.allclose(frac, g["atom_frac_coord"].detach().numpy(), atol=1e-5)  # not wrapped
        g["atom_frac_coord"] = torch.tensor(frac, dtype=dtype, requires_grad=True)
        g["lattice"] = torch.tensor(a.cell.array, dtype=dtype)
        g["neighbor_image"] = g["neighbor_image"].to(dtype)
        graphs.append(CrystalGraph(**g))
    out = chgnet(graphs, task="ef")
    n = torch.tensor([len(a) for a in atoms_list])
    return (out["e"] * n).detach().numpy(), np.concatenate([f.detach().numpy() for f in out["f"]])


def write_labelled(path, structures):
    """Write Structures to extxyz with their labels as ``energy`` / ``forces`` keys."""
    out = []
    for s in structures:
        a = s.atoms.copy()
        a.calc = None
        a.info["energy"], a.arrays["forces"] = s.energy, np.array(s.forces)
        out.append(a)
    ase.io.write(path, out, format="extxyz")
    return path


def run(model, batch, sample, seed=3):
    out = model(batch, sample=sample, seed=seed if sample else None)
    return out["energy"].detach().numpy(), out["forces"].detach().numpy()


# -- MAP equals plain CHGNet --------------------------------------------------------
def test_map_equals_chgnet_in_float64(pretrained, si):
    """Message passing and forces agree to 1e-8 (float64; CHGNet's AtomRef only runs in float32)."""
    plain = copy.deepcopy(pretrained).double()
    plain.composition_model = None
    stripped = copy.deepcopy(pretrained)
    stripped.composition_model = None
    atoms = [s.atoms for s in si[:2]]
    e_ref, f_ref = chgnet_reference(plain, atoms, torch.float64)
    energy, forces = run(wrapped(stripped), batch_of(atoms), sample=False)
    np.testing.assert_allclose(energy, e_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(forces, f_ref, rtol=0, atol=1e-8)


# -- domains -------------------------------------------------------------------------
def test_domain_rows_follow_chgnet_graphs(pretrained, si, rattled):
    """atom = atoms, atom_edge = directed pairs < 6 A, bond = pairs / 2, angle = ordered pairs of
    distinct bonds < 3 A at one atom; every noisy layer sees exactly its domain's rows."""
    model = wrapped(pretrained)
    atoms = [si[0].atoms, rattled[0]]
    batch = model.backbone.prepare(batch_of(atoms))
    feats = model.backbone.domain_features(batch)
    dims = model.backbone.domain_feature_dims()
    rows = {d: c.tolist() for d, (_, c) in feats.items()}
    pairs = [int(build_graph(a, 6.0)["n_edges"][0]) for a in atoms]
    short = [np.bincount(build_graph(a, 3.0)["edge_index"][0], minlength=len(a)) for a in atoms]
    assert rows["atom"] == [len(a) for a in atoms]
    assert rows["atom_edge"] == pairs
    assert rows["bond"] == [p // 2 for p in pairs]
    assert rows["angle"] == [int((k * (k - 1)).sum()) for k in short]
    for d, (f, c) in feats.items():
        assert f.shape == (int(c.sum()), dims[d]) and torch.isfinite(f).all()
    seen = {}
    hooks = [model.backbone.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, d=d: seen.setdefault(d, set()).add(inp[0].shape[0]))
        for d, names in model.layers.items() for name in names]
    model(batch_of(atoms), sample=True, seed=0)
    for h in hooks:
        h.remove()
    assert {d: s for d, s in seen.items()} == {d: {sum(r)} for d, r in rows.items()}
    assert {d: len(n) for d, n in model.layers.items()} == {"atom": 4, "atom_edge": 16, "bond": 3, "angle": 18}


def test_noise_domains_choose_the_noisy_mlps(pretrained, rattled):
    """``model.noise_domains`` (default atom and bond updates) wraps exactly those MLPs; a model file
    written before the key existed (no key in its config) keeps noise on all four domains; an unknown
    domain is a config error."""
    cfg = config.resolve({"model": {"backbone": "chgnet"}})
    assert cfg["model"]["noise_domains"] == ["atom", "bond"]
    model = build_potential(cfg, SI)
    assert sorted(model.layers) == ["atom", "bond"]
    assert all(".mlp_out." in name for names in model.layers.values() for name in names)
    assert {d: len(n) for d, n in model.layers.items()} == {"atom": 4, "bond": 3}
    assert sorted(model.inference.heads) == ["atom", "bond"]
    old = copy.deepcopy(cfg)
    del old["model"]["noise_domains"]
    assert sorted(build_potential(old, SI).layers) == sorted(NOISE_DOMAINS)
    with pytest.raises(ConfigError, match="noise_domains"):
        config.resolve({"model": {"backbone": "chgnet", "noise_domains": ["atom", "pairs"]}})
    # the default model samples: its spread comes from the atom and bond updates alone
    model = model.double()
    for head in model.inference.heads_list():
        torch.nn.init.constant_(head.net[2].bias, math.log(0.05 / 0.95) - head.logit0)
    batch = batch_of(rattled)
    map_energy = run(model, batch, sample=False)[0]
    energies = [run(model, batch, sample=True, seed=s)[0] for s in (1, 2)]
    assert np.abs(energies[0] - map_energy).max() > 1e-4 and np.abs(energies[0] - energies[1]).max() > 1e-4


# -- samples -------------------------------------------------------------------------
def test_noise_reproducible_and_batched_equals_sequential(pretrained, rattled, monkeypatch):
    import blip.backbones.chgnet as chgnet_module

    model = wrapped(pretrained, p=0.05)
    atoms = rattled
    batch = batch_of(atoms)
    calls = []
    original = chgnet_module.build_topology
    monkeypatch.setattr(chgnet_module, "build_topology", lambda *a: calls.append(1) or original(*a))
    k = 3
    energy, forces = run(model, replicate(batch, k), sample=True, seed=11)
    assert len(calls) == len(atoms)  # one CHGNet graph per structure, reused by the K replicas
    energy, forces = energy.reshape(k, 2), forces.reshape(k, -1, 3)
    assert np.abs(energy[0] - energy[1]).max() > 1e-4  # replicas differ
    for r in range(k):
        one = replicate(batch, 1)
        one["replica"] += r
        e_r, f_r = run(model, one, sample=True, seed=11)
        np.testing.assert_allclose(e_r, energy[r], rtol=0, atol=1e-9)
        np.testing.assert_allclose(f_r, forces[r], rtol=0, atol=1e-9)
    # a structure's sample does not depend on the other structures in the batch
    alone = batch_of(atoms[1:], first_index=1)
    e_1, _ = run(model, replicate(alone, 1), sample=True, seed=11)
    assert e_1[0] == pytest.approx(energy[0, 1], abs=1e-9)
    assert len(calls) == len(atoms)
    assert not np.allclose(run(model, batch, sample=True, seed=12)[0], energy[0])


# -- fine-tuning through the Trainer and CLI ------------------------------------------
def si_config(tmp_path, **sections) -> Path:
    user = {
        "data": {"train_file": str(DATA / "si_small.xyz"), "valid_fraction": 0.34, "e0s": None,
                 "test_files": {"si": str(DATA / "si_small.xyz")}},
        "model": {"backbone": "chgnet"},
        "uq": {"method": "blip", "samples": 2, "prior_p": 0.01, "beta": 1e-3, "p_init": 5e-5, "p_min": 1e-5,
               "p_max": 0.1},
        "training": {"epochs": 1, "batch_size": 2, "lr": 1e-4, "inference_lr": 1e-2, "grad_clip": 1.0},
        "output_dir": str(tmp_path / "run"),
    }
    for name, values in sections.items():
        user.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(user))
    return path


def test_one_finetuning_step_changes_weights(tmp_path, pretrained):
    from blip.io import load
    from blip.train.loop import Trainer

    cfg = config.load(si_config(tmp_path, training={"ema_decay": 0.0}))
    Trainer(cfg, progress=False).run()
    model = load(Path(cfg["output_dir"]) / "model.pt")
    state = model.members[0].state_dict()
    before = pretrained.state_dict()
    name = "atom_conv_layers.0.twoBody_atom.mlp_core.layers.0.weight"
    assert not torch.equal(state[f"backbone.chgnet.{name}"], before[name])
    assert torch.equal(state["backbone.chgnet.composition_model.fc.weight"], before["composition_model.fc.weight"])
    fresh = wrapped(pretrained, dtype=torch.float32)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in state.items() if k.startswith("inference."))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # inside chgnet
def test_zero_epochs_writes_the_pretrained_model(tmp_path, pretrained, si):
    """``blip train`` with epochs 0: MAP of model.pt = CHGNet's predict_structure (float32).

    Force tolerance is float32 round-off: CHGNet's own float32 forces differ from its float64
    forces by up to 2.3e-4 eV/A on these structures (measured); the float64 test is exact.
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    from blip.io import load

    one = write_labelled(tmp_path / "one.xyz", si[2:])
    path = si_config(tmp_path, training={"epochs": 0}, data={"test_files": {"one": str(one)}})
    assert main(["train", str(path), "--quiet"]) == 0
    out = tmp_path / "run"
    metrics = json.loads((out / "test_metrics.json").read_text())["one"]
    atoms = [s.atoms for s in si[:2]]
    model = load(out / "model.pt")
    pred = model.predict(atoms, samples=0)
    ref = pretrained.predict_structure([AseAtomsAdaptor.get_structure(a) for a in atoms], task="ef")
    f_ref = np.concatenate([p["f"] for p in ref])
    np.testing.assert_allclose(pred["energy"], [p["e"] * len(a) for p, a in zip(ref, atoms)], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(pred["forces"]), f_ref, rtol=0, atol=5e-4)
    # samples at p_init = 5e-5 stay close to the pretrained model: fine-tuning starts from it
    sampled = model.predict(atoms, samples=2, seed=0)
    assert np.abs(sampled["energy"] - pred["energy"]).max() < 0.1
    assert np.sqrt(np.mean((np.concatenate(sampled["forces"]) - f_ref) ** 2)) < 0.01
    assert metrics["forces"]["n"] == 3 * len(si[2].atoms) and metrics["forces"]["rmse"] > 0


# -- bad input -----------------------------------------------------------------------
def test_cutoff_disagreeing_with_pretrained_is_a_config_error(tmp_path, capsys):
    cfg = config.load(si_config(tmp_path, model={"cutoff": 5.0}))
    with pytest.raises(ConfigError, match=r"model.cutoff is 5 A .* cutoff of 6 A"):
        build_potential(cfg, SI)
    assert main(["train", str(si_config(tmp_path, model={"cutoff": 5.0})), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("blip: error: model.cutoff is 5 A") and "Traceback" not in "".join(err)
    assert config.load(si_config(tmp_path))["model"]["cutoff"] == 6.0  # the default follows CHGNet
    # pretrained: false builds an untrained CHGNet of the same architecture, any cutoff > 3 A
    cfg = config.load(si_config(tmp_path, model={"cutoff": 5.0, "pretrained": False}))
    untrained = build_potential(cfg, SI).backbone
    assert untrained.cutoff == 5.0 and sorted(untrained.noisy_layers().values()) == ["atom", "bond"]


def test_element_outside_chgnet_is_a_data_error(tmp_path, pretrained, si, capsys):
    with pytest.raises(DataError, match="outside CHGNet 0.3.0's element set"):
        CHGNetBackbone(copy.deepcopy(pretrained), DatasetSummary(elements=[14, 95]))
    model = wrapped(pretrained)
    alien = si[0].atoms.copy()
    alien.numbers[5] = 95  # americium: beyond CHGNet's Z = 1..94
    with pytest.raises(DataError, match="Z = 95 is outside"):
        model(batch_of([alien]))
    write_labelled(tmp_path / "alien.xyz", si)
    structures = ase.io.read(tmp_path / "alien.xyz", ":")
    structures[1].numbers[0] = 95
    ase.io.write(tmp_path / "alien.xyz", structures, format="extxyz")
    path = si_config(tmp_path, data={"train_file": str(tmp_path / "alien.xyz"), "test_files": {}})
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "outside CHGNet" in err[-1] and err[-1].startswith("blip: error:")


def test_gated_mlps_share_one_whitening_and_samples_stay_the_same(pretrained, rattled, monkeypatch):
    """CHGNet's gated MLPs feed one input tensor to their core and gate: a sampled pass whitens it once
    for both (one whitening per gated MLP, not two), with the energies and forces of separate whitenings."""
    import blip.bayes.inference as inference
    from blip.bayes.density import FeatureDensity

    backbone = CHGNetBackbone(copy.deepcopy(pretrained), DatasetSummary(elements=[8, 14]), noise_domains=NOISE_DOMAINS)
    model = BayesianPotential(backbone, prior_p=0.01, p_min=1e-5, p_max=0.1, p_init=0.05).double()
    for head in model.inference.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=0.3)
    batch = batch_of(rattled)
    model.fit_feature_statistics([batch])
    calls = []
    original = FeatureDensity.standardise_split
    monkeypatch.setattr(FeatureDensity, "standardise_split",
                        lambda self, x, split, *rest: calls.append(1) or original(self, x, split, *rest))
    shared = run(model, replicate(batch, 2), sample=True, seed=5)
    n_shared, calls[:] = len(calls), []
    monkeypatch.setattr(inference, "_twin", lambda *args: None)
    separate = run(model, replicate(batch, 2), sample=True, seed=5)
    slots = len(model.inference.heads_list())
    gated = sum(1 for name, _ in model.backbone.named_modules() if name.endswith(".mlp_gate"))
    assert len(calls) == slots and n_shared == slots - gated
    np.testing.assert_array_equal(shared[0], separate[0])
    np.testing.assert_allclose(shared[1], separate[1], rtol=0, atol=1e-10)


def test_each_atom_gets_its_feature_distance(pretrained, rattled):
    """CHGNet's per-atom domain is "atom": a sampled pass gives every atom a finite log feature
    distance, the same on a translated copy, and larger on a strongly distorted copy."""
    model = wrapped(pretrained)
    model.fit_feature_statistics([batch_of(rattled)])
    assert model.wants_novelty

    def novelty(atoms_list):
        return model(batch_of(atoms_list), sample=True, seed=1, novelty=True)["novelty"].detach().numpy()

    nu = novelty(rattled)
    assert nu.shape == (sum(len(a) for a in rattled),) and np.isfinite(nu).all()
    moved = [a.copy() for a in rattled]
    for a in moved:
        a.positions += [0.3, -0.2, 0.5]
    np.testing.assert_allclose(novelty(moved), nu, rtol=0, atol=1e-8)
    squeezed = [a.copy() for a in rattled]
    for a in squeezed:
        a.set_cell(a.cell * 0.85, scale_atoms=True)
    assert novelty(squeezed).mean() > nu.mean() + 0.5
