"""blip export: the metatomic model equals blip.Calculator (MAP energy, forces, noise samples, spread).

Tiny float64 PaiNN models (8 channels, 2 interactions), untrained but with feature statistics
fitted on the test structures and p_init 0.05, so that the rates vary from row to row and the
spread is far from zero. Tolerances (float64): energies, samples and std 1e-10 eV, forces
1e-10 eV/A (observed: equal to ~1e-14); stress vs a central finite difference of the exported
energy (h = 1e-5), 1e-9 eV/A^3 (stress ~1e-4 eV/A^3 with these weights). The MACE section
at the end runs the same checks on tiny MACE models, with the same tolerances.
"""

from __future__ import annotations

import copy

import sys
import types

import ase.io
import numpy as np
import pytest
import torch

import blip
from blip import config
from blip.backbones.base import DatasetSummary
from blip.build import build_potential
from blip.data import build_graph, collate
from blip.io import save_model
from blip.predictor import BlipModel

from conftest import DATA, pulled_out, rattled_si_cells

mta = pytest.importorskip("metatomic.torch")
from metatomic.torch import ModelOutput, load_atomistic_model  # noqa: E402
from metatomic_ase import MetatomicCalculator  # noqa: E402

from blip.export import ExportError, build_exported, export_model  # noqa: E402

TOL = 1e-10
K, SEED = 5, 3
SPREAD = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="system"),
          "energy_ensemble": ModelOutput(unit="eV", sample_kind="system")}


def _structures():
    return [ase.io.read(DATA / "acac_small.xyz", 1), rattled_si_cells()[0]]


def _test_structure(which: str):
    """acac, si, or acac with an H pulled 3.5 A out ("leaving": its isolated-atom switch between 0 and 1)."""
    if which == "leaving":
        return pulled_out(_structures()[0], 9, 3.5)
    return _structures()[0 if which == "acac" else 1]


MODEL_SETTINGS = {
    "painn": {"features": 8, "interactions": 2, "radial": 6},
    "mace": {"cutoff": 4.0, "hidden_irreps": "8x0e + 8x1o", "correlation": 2, "num_interactions": 2,
             "num_radial": 4, "max_ell": 2, "radial_mlp": [8, 8], "mlp_irreps": "4x0e"},
}


def tiny_model(method: str = "blip", members: int = 1, seed: int = 0, backbone: str = "painn", **uq) -> BlipModel:
    """A float64 PaiNN (or MACE) BlipModel for H, C, O, Si with fitted feature statistics and
    calibration 1.7; MACE's rate heads get random last layers (rates that vary from row to row)
    and its species shifts random values."""
    torch.manual_seed(seed)
    summary = DatasetSummary(elements=[1, 6, 8, 14], e0s={1: -13.6, 6: -1026.9, 8: -2037.8, 14: -107.2},
                             energy_shift=-1.0, force_scale=0.5)
    noise = {k: uq.pop(k) for k in ("edge_noise", "vector_noise", "message_noise") if k in uq}
    cfg = config.resolve({"model": {"backbone": backbone, **MODEL_SETTINGS[backbone],
                                    "dtype": "float64", **noise},
                          "uq": {"method": method, "samples": 4, "p_init": 0.05, "dropout_p": 0.2, **uq}})
    pots = [build_potential(cfg, summary) for _ in range(members)]
    cutoff = float(cfg["model"]["cutoff"])
    batch = collate([build_graph(a, cutoff, index=i) for i, a in enumerate(_structures())], dtype=torch.float64)
    for pot in pots:
        if backbone == "mace":  # a learned energy per species (starts at 0), so that the export carries it
            torch.nn.init.normal_(pot.backbone.species_shift, std=0.5)
        if backbone == "mace" and pot.inference is not None:
            for head in pot.inference.heads_list():
                torch.nn.init.normal_(head.net[2].weight, std=0.5)
        pot.fit_feature_statistics([batch])
    return BlipModel(pots, cfg, summary, calibration={"energy": 1.7, "forces": 1.3})


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exported_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "blip-metatomic.pt"
    source = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, source)
    assert export_model(source, path, samples=K, seed=SEED) == path  # from the file, as `blip export` does
    return path


@pytest.fixture(scope="module")
def metatomic_calc(exported_path):
    return MetatomicCalculator(load_atomistic_model(str(exported_path)), check_consistency=True)


def _scripted(exported, tmp_path):
    """The TorchScript model as an engine sees it: saved and loaded back."""
    path = tmp_path / "exported.pt"
    exported.save(str(path))
    return load_atomistic_model(str(path))


def _compare(atoms, calc, model, samples=K, seed=SEED):
    """Energy, forces (ASE interface) and the spread (run_model) of calc vs blip.Calculator."""
    atoms = atoms.copy()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    out = calc.run_model(atoms, SPREAD)
    ref = blip.Calculator(model, samples=samples, seed=seed)
    ref.calculate(atoms.copy(), ["energy", "forces"])
    r = ref.results
    assert energy == pytest.approx(r["energy"], abs=TOL)
    np.testing.assert_allclose(forces, r["forces"], rtol=0, atol=TOL)
    std = out["energy_uncertainty"].block().values.detach().numpy()
    ensemble = out["energy_ensemble"].block().values.detach().numpy()
    assert std.shape == (1, 1) and ensemble.shape == (1, len(r["energy_samples"]))
    assert r["energy_std"] > 1e-4  # the noise is not trivially zero
    assert float(std[0, 0]) == pytest.approx(r["energy_std"], abs=TOL)
    np.testing.assert_allclose(ensemble[0], r["energy_samples"], rtol=0, atol=TOL)
    return r


@pytest.mark.parametrize("which", ["acac", "si", "leaving"])
def test_exported_model_equals_blip_calculator(which, metatomic_calc, model):
    atoms = _test_structure(which)
    assert atoms.pbc.any() == (which == "si")
    r = _compare(atoms, metatomic_calc, model)
    assert len(r["energy_samples"]) == K
    deviation = np.sqrt(np.mean((r["energy_samples"] - r["energy"]) ** 2))  # about the MAP energy
    assert float(deviation) == pytest.approx(r["energy_std"], rel=1e-12)


def _finite_difference_stress(atoms, calc, h: float = 1e-5) -> np.ndarray:
    """Central difference of the energy under a symmetric strain, over the volume (3, 3), eV/A^3."""
    volume, cell, pos = atoms.get_volume(), atoms.cell.array.copy(), atoms.positions.copy()

    def strained_energy(a, b, step):
        eps = np.eye(3)
        eps[a, b] += step / 2
        eps[b, a] += step / 2
        other = atoms.copy()
        other.set_cell(cell @ eps, scale_atoms=False)
        other.positions = pos @ eps
        other.calc = calc
        return other.get_potential_energy()

    return np.array([[(strained_energy(a, b, h) - strained_energy(a, b, -h)) / (2 * h * volume) for b in range(3)]
                     for a in range(3)])


def test_stress_is_the_strain_derivative_of_the_exported_energy(metatomic_calc):
    atoms = rattled_si_cells()[1]
    atoms.calc = metatomic_calc
    stress = atoms.get_stress(voigt=False)
    fd = _finite_difference_stress(atoms, metatomic_calc)
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, fd, rtol=0, atol=1e-9)


def test_exported_stress_equals_blips_own(metatomic_calc, model):
    atoms = rattled_si_cells()[1]
    atoms.calc = metatomic_calc
    ref = atoms.copy()
    ref.calc = blip.Calculator(model, mode="map")
    np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), rtol=0, atol=1e-10)


def test_per_atom_energies_and_selected_atoms(exported_path, model):
    exported = load_atomistic_model(str(exported_path))
    atoms = _structures()[0]
    calc = MetatomicCalculator(exported, check_consistency=True)
    per_atom = calc.run_model(atoms, {"energy": ModelOutput(unit="eV", sample_kind="atom")})["energy"]
    values = per_atom.block().values.numpy()[:, 0]
    assert values.shape == (len(atoms),)
    total = blip.Calculator(model, samples=0).get_potential_energy(atoms.copy())
    assert values.sum() == pytest.approx(total, abs=TOL)
    from metatensor.torch import Labels

    chosen = Labels(["system", "atom"], torch.tensor([[0, 0], [0, 3], [0, 5]], dtype=torch.int32))
    part = calc.run_model(atoms, {"energy": ModelOutput(unit="eV", sample_kind="system")}, selected_atoms=chosen)
    assert float(part["energy"].block().values[0, 0]) == pytest.approx(values[[0, 3, 5]].sum(), abs=TOL)


@pytest.mark.parametrize("variant", ["mc_dropout", "edge_noise", "vector_noise", "message_noise", "mc_dropout_vector_noise",
                                     "predict_mean_samples", "independent", "mahalanobis", "both_distances",
                                     "nearest", "distance_offset", "row_draws"])
def test_variants_equal_blip_calculator(variant, tmp_path):
    if variant == "mc_dropout":
        model = tiny_model("mc_dropout")
    elif variant in ("mahalanobis", "both_distances", "nearest"):
        model = tiny_model(distance_metric={"both_distances": "both"}.get(variant, variant))
    elif variant == "distance_offset":
        model = tiny_model(distance_offset=0.05)
    elif variant == "row_draws":  # independent draws per atom and per edge (the default shares them per structure)
        model = tiny_model(noise_draws="row", edge_noise=True)
    elif variant == "edge_noise":
        model = tiny_model(edge_noise=True)
    elif variant == "vector_noise":
        model = tiny_model(vector_noise=True)
    elif variant == "message_noise":
        model = tiny_model(message_noise=True)
    elif variant == "mc_dropout_vector_noise":
        model = tiny_model("mc_dropout", vector_noise=True)
    elif variant == "predict_mean_samples":
        model = tiny_model(predict_mean="samples")
    else:
        model = tiny_model(weight_noise="independent", rate_inputs="species", distance=False)
    calc = MetatomicCalculator(_scripted(build_exported(model, samples=3, seed=1), tmp_path), check_consistency=True)
    for atoms in _structures():
        _compare(atoms, calc, model, samples=3, seed=1)


def test_ensemble_exports_member_mean_and_members(tmp_path):
    model = tiny_model("ensemble", members=2)
    calc = MetatomicCalculator(_scripted(build_exported(model, samples=7), tmp_path), check_consistency=True)  # K = members
    r = _compare(_structures()[1], calc, model, samples=None)
    assert len(r["energy_samples"]) == 2


@pytest.mark.parametrize("backbone", ["painn", "mace"])
def test_mixture_of_networks_equals_blip_calculator(backbone, tmp_path):
    """A model of two sampled networks (uq.networks): each network its own seed, share of K, factor
    and widening (here only the second widens), mixed as blip.Calculator mixes them: the mixture's
    factor 0.6 where the structure's largest distance lies within the networks' validation limit,
    1 beyond it (the limit here lies between the two test structures' largest distances)."""
    if backbone == "mace":
        pytest.importorskip("mace")
    model = tiny_model(members=2, backbone=backbone, networks=2)
    assert model.mixture
    networks = [{"energy": 1.4, "forces": 1.1},
                {"energy": 2.0, "forces": 0.9, "energy_novelty": 0.7, "energy_novelty_centre": -1.0}]
    model.calibration = {"energy": 0.6, "forces": 0.7, "networks": networks}
    unlimited = MetatomicCalculator(build_exported(model, samples=K, seed=SEED), check_consistency=True)
    nu_max = [model.predict([a], samples=K, seed=SEED, novelty=True)["atom_novelty"][0].max() for a in _structures()]
    limit = float(np.mean(nu_max))
    assert abs(nu_max[0] - nu_max[1]) > 0.05
    model.calibration = {**model.calibration,
                         "networks": [{**n, "energy_novelty_limit": limit + d} for n, d in zip(networks, (-0.01, 0.01))]}
    exported = build_exported(model, samples=K, seed=SEED)
    assert "2 networks" in exported.metadata().description and "seed 4" in exported.metadata().description
    calc = MetatomicCalculator(_scripted(exported, tmp_path), check_consistency=True)
    for atoms, nu in zip(_structures(), nu_max):
        r = _compare(atoms, calc, model)
        assert len(r["energy_samples"]) == K
        nets = [net.predict([atoms], samples=k, seed=SEED + m) for m, (net, k) in enumerate(zip(model.networks(), [3, 2]))]
        assert r["energy"] == pytest.approx(np.mean([n["energy"][0] for n in nets]), abs=TOL)
        assert abs(nets[0]["energy"][0] - nets[1]["energy"][0]) > 1e-3  # two networks that differ
        shrunk = unlimited.run_model(atoms, SPREAD)["energy_uncertainty"].block().values.item()
        assert r["energy_std"] == pytest.approx(shrunk / 0.6 if nu > limit else shrunk, rel=1e-9)


def test_deterministic_and_zero_samples_export_energy_only(tmp_path):
    model = tiny_model("deterministic")
    for exported in (build_exported(model), build_exported(tiny_model(), samples=0)):
        outputs = exported.capabilities().outputs
        assert "energy" in outputs and "energy_uncertainty" not in outputs and "energy_ensemble" not in outputs
    atoms = _structures()[1]
    atoms.calc = MetatomicCalculator(_scripted(build_exported(model), tmp_path), check_consistency=True)
    ref = blip.Calculator(model)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(atoms.copy()), abs=TOL)


def _energy_factor(nu_max, limit):
    """The energy widening of the calibration below: exp(0.7 (nu_max + 1) + 0.5 max(0, nu_max - limit))."""
    return np.exp(0.7 * (nu_max + 1.0) + 0.5 * np.maximum(0.0, nu_max - limit))


@pytest.mark.parametrize("backbone", ["painn", "mace"])
def test_exported_energy_spread_carries_the_novelty_widening(backbone, tmp_path):
    """With the recalibration's energy widening (energy_novelty b_E, and b2 beyond the limit) the
    exported spread and samples equal blip.Calculator's widened ones, and differ from the unwidened
    export by the structure's factor of BlipModel.predict; a selection of atoms is widened with its
    own largest distance."""
    if backbone == "mace":
        pytest.importorskip("mace")
    from metatensor.torch import Labels

    model = tiny_model(backbone=backbone)
    nus = [model.predict([a], samples=3, seed=1, novelty=True)["atom_novelty"][0] for a in _structures()]
    limit = min(float(nu.max()) for nu in nus) - 0.05  # every structure's largest distance lies beyond it
    widened = copy.copy(model)
    widened.calibration = {**model.calibration, "forces_novelty": 0.1, "novelty_centre": -1.0,
                           "energy_novelty": 0.7, "energy_novelty_centre": -1.0,
                           "energy_novelty_beyond": 0.5, "energy_novelty_limit": limit}
    exported = build_exported(widened, samples=3, seed=1)
    assert "widened by exp(0.7 (nu_max + 1))" in exported.metadata().description
    assert "and by exp(0.5 (nu_max" in exported.metadata().description
    calc = MetatomicCalculator(_scripted(exported, tmp_path), check_consistency=True)
    plain = MetatomicCalculator(build_exported(model, samples=3, seed=1), check_consistency=True)
    for atoms, nu in zip(_structures(), nus):
        r = _compare(atoms, calc, widened, samples=3, seed=1)
        factor = _energy_factor(nu.max(), limit)
        assert abs(factor - 1.0) > 0.05  # the widening is not trivially one here
        unwidened = plain.run_model(atoms, SPREAD)["energy_uncertainty"].block().values.item()
        assert r["energy_std"] == pytest.approx(factor * unwidened, rel=1e-9)
    # selected atoms: the energy of the selection, widened with the selection's largest distance
    atoms, nu = _structures()[0], nus[0]
    chosen = [int(np.argmin(nu)), int(np.argsort(nu)[1])]  # the two most familiar atoms
    labels = Labels(["system", "atom"], torch.tensor([[0, i] for i in chosen], dtype=torch.int32))
    spread = [c.run_model(atoms, SPREAD, selected_atoms=labels)["energy_uncertainty"].block().values.item()
              for c in (calc, plain)]
    assert _energy_factor(nu[chosen].max(), limit) < 0.95 * _energy_factor(nu.max(), limit)
    assert spread[0] == pytest.approx(_energy_factor(nu[chosen].max(), limit) * spread[1], rel=1e-9)


def test_cli_default_samples_are_the_models(tmp_path, model):
    from blip.cli import main

    source, out = tmp_path / "model.pt", tmp_path / "exported.pt"
    save_model(model, source)
    assert main(["export", str(source), "-o", str(out)]) == 0
    calc = MetatomicCalculator(load_atomistic_model(str(out)), check_consistency=True)
    r = _compare(_structures()[0], calc, model, samples=None, seed=0)
    assert len(r["energy_samples"]) == model.config["uq"]["samples"] == 4


@pytest.mark.parametrize("backbone, reason", [("chgnet", "TorchScript cannot compile"),
                                               ("schnet", "supports the painn, mace backbone")])
def test_unsupported_backbones_fail_with_the_reason(backbone, reason):
    fake = types.SimpleNamespace(config={"model": {"backbone": backbone}, "uq": {"method": "blip"}})
    with pytest.raises(ExportError, match=reason):
        build_exported(fake)


def test_missing_metatomic_names_the_extra(monkeypatch, model, tmp_path):
    monkeypatch.setitem(sys.modules, "metatomic.torch", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install blip-mlip\[metatomic\]"):
        export_model(model, tmp_path / "x.pt")


def test_ipi_metatomic_driver_gives_energy_and_committee(exported_path, model, tmp_path):
    pytest.importorskip("ipi")
    import json

    from ipi.pes.metatomic import MetatomicDriver
    from ipi.utils.units import unit_to_internal, unit_to_user

    atoms = _structures()[1]
    ase.io.write(tmp_path / "template.xyz", atoms)
    driver = MetatomicDriver(template=str(tmp_path / "template.xyz"), model=str(exported_path),
                             energy_ensemble=True, check_consistency=True)
    cell = unit_to_internal("length", "angstrom", atoms.cell.array.T.copy())
    pos = unit_to_internal("length", "angstrom", atoms.positions.copy())
    energy, _forces, _virial, extras = driver.compute_structure(cell, pos)
    ref = blip.Calculator(model, samples=K, seed=SEED)
    ref.calculate(atoms.copy(), ["energy"])
    assert unit_to_user("energy", "electronvolt", energy) == pytest.approx(ref.results["energy"], abs=1e-8)
    committee = [unit_to_user("energy", "electronvolt", e) for e in json.loads(extras)["committee_pot"]]
    np.testing.assert_allclose(committee, ref.results["energy_samples"], rtol=0, atol=1e-8)


# -- MACE ----------------------------------------------------------------------------------
# Tiny float64 MACE models (8x0e + 8x1o, 2 interactions, 4 radial functions, max_ell 2,
# correlation 2), untrained, with random rate-head last layers and fitted feature statistics:
# rates vary from row to row. Same tolerances as PaiNN (observed: energies and samples ~5e-12 eV,
# from the order of the float64 sums of ~1e4 eV totals; forces ~1e-16 eV/A).
@pytest.fixture(scope="module")
def mace_model():
    pytest.importorskip("mace")
    return tiny_model(backbone="mace")


@pytest.fixture(scope="module")
def mace_calc(mace_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export-mace") / "blip-mace.pt"
    source = tmp_path_factory.mktemp("model-mace") / "model.pt"
    save_model(mace_model, source)
    export_model(source, path, samples=K, seed=SEED)  # from the file, as `blip export` does
    return MetatomicCalculator(load_atomistic_model(str(path)), check_consistency=True)


def test_mace_rates_vary_from_row_to_row(mace_model):
    pot = mace_model.members[0]
    batch = collate([build_graph(a, 4.0, index=i) for i, a in enumerate(_structures())], dtype=torch.float64)
    rates = pot.rates(batch, seed=0)
    assert len(rates) == 5  # interactions.1.linear_up, interactions.{0,1}.linear, products.{0,1}.linear
    for p in rates.values():
        assert float(p.detach().std()) > 1e-2 * float(p.detach().mean())


@pytest.mark.parametrize("which", ["acac", "si", "leaving"])
def test_mace_exported_model_equals_blip_calculator(which, mace_calc, mace_model):
    atoms = _test_structure(which)
    r = _compare(atoms, mace_calc, mace_model)
    assert len(r["energy_samples"]) == K
    per_atom = mace_calc.run_model(atoms, {"energy": ModelOutput(unit="eV", sample_kind="atom")})["energy"]
    assert float(per_atom.block().values.sum()) == pytest.approx(r["energy"], abs=TOL)


def test_mace_stress_is_the_strain_derivative_of_the_exported_energy(mace_calc):
    atoms = rattled_si_cells()[1]
    atoms.calc = mace_calc
    stress = atoms.get_stress(voigt=False)
    fd = _finite_difference_stress(atoms, mace_calc)
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, fd, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", ["edge_noise", "edge_noise_independent", "mc_dropout_edge_noise"])
def test_mace_variants_equal_blip_calculator(variant, tmp_path):
    """Every noisy layer kind: irreps channel noise (Gaussian, Bernoulli) and the radial MLPs' noise
    (per-input Gaussian, local reparameterisation, Bernoulli) with edge rows."""
    pytest.importorskip("mace")
    if variant == "edge_noise":
        model = tiny_model(backbone="mace", edge_noise=True)
    elif variant == "edge_noise_independent":
        model = tiny_model(backbone="mace", edge_noise=True, weight_noise="independent")
    else:
        model = tiny_model("mc_dropout", backbone="mace", edge_noise=True)
    assert "edge" in model.members[0].layers
    calc = MetatomicCalculator(_scripted(build_exported(model, samples=3, seed=1), tmp_path), check_consistency=True)
    for atoms in _structures():
        _compare(atoms, calc, model, samples=3, seed=1)


def test_mace_ensemble_and_deterministic(tmp_path):
    pytest.importorskip("mace")
    model = tiny_model("ensemble", members=2, backbone="mace")
    calc = MetatomicCalculator(_scripted(build_exported(model), tmp_path), check_consistency=True)
    r = _compare(_structures()[1], calc, model, samples=None)
    assert len(r["energy_samples"]) == 2
    deterministic = tiny_model("deterministic", backbone="mace")
    exported = build_exported(deterministic)
    assert "energy_uncertainty" not in exported.capabilities().outputs
    atoms = _structures()[0]
    atoms.calc = MetatomicCalculator(_scripted(exported, tmp_path), check_consistency=True)
    ref = blip.Calculator(deterministic)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(atoms.copy()), abs=TOL)
