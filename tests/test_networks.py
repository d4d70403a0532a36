"""Several sampled networks (``uq.networks``): trained from their own seeds, predicted as their mixture."""

from __future__ import annotations

import copy

import ase.io
import numpy as np
import pytest

import blip
from blip.config import networks_of
from blip.data import read_labelled
from blip.errors import ConfigError
from blip.io import save_model
from blip.train.loop import Trainer
from blip.uq.mixture import factor_within, network_limit, network_shares
from blip.uq.recalibration import calibrated_std, recalibrate
from conftest import DATA, tiny_config


@pytest.fixture(scope="module")
def two_networks(tmp_path_factory):
    """A tiny BLIP-PaiNN of two networks, 2 epochs on 16 acac structures (raw spreads: no calibration)."""
    cfg = tiny_config(tmp_path_factory.mktemp("networks"), uq={"samples": 4, "networks": 2},
                      data={"max_train": 16}, training={"epochs": 2})
    Trainer(cfg, progress=False).run()
    model = blip.load(cfg["output_dir"] + "/model.pt")
    model.calibration = {"energy": 1.0, "forces": 1.0}
    return model


@pytest.fixture(scope="module")
def atoms():
    return ase.io.read(DATA / "acac_small.xyz", ":4")


def test_k_samples_split_evenly_over_the_networks_at_least_one_each():
    assert network_shares(16, 1) == [16]
    assert network_shares(16, 2) == [8, 8]
    assert network_shares(5, 2) == [3, 2]
    assert network_shares(1, 3) == [1, 1, 1]


def test_networks_train_from_their_own_seeds(two_networks):
    assert networks_of(two_networks.config) == 2 and len(two_networks.members) == 2
    first, second = (m.state_dict() for m in two_networks.members)
    assert any(not np.allclose(first[k].numpy(), second[k].numpy()) for k in first if first[k].is_floating_point())


def test_the_mixture_is_the_networks_mean_and_their_spreads_plus_disagreement(two_networks, atoms):
    """Mean of the networks' predictions; spread sqrt(mean sigma_m^2 + mean (mu_m - mu)^2); samples:
    network m's own (seed + m, its share of K) in order."""
    out = two_networks.predict(atoms, samples=4, seed=0)
    nets = [net.predict(atoms, samples=2, seed=m) for m, net in enumerate(two_networks.networks())]
    mean = np.mean([n["energy"] for n in nets], axis=0)
    np.testing.assert_allclose(out["energy"], mean, rtol=0, atol=1e-9)
    variance = np.mean([n["energy_std"] ** 2 + (n["energy"] - mean) ** 2 for n in nets], axis=0)
    np.testing.assert_allclose(out["energy_std"], np.sqrt(variance), rtol=1e-12)
    assert np.all(out["energy_std"] > np.max([n["energy_std"] for n in nets], axis=0))  # they disagree
    np.testing.assert_allclose(out["energy_samples"], np.concatenate([n["energy_samples"] for n in nets]), atol=1e-9)
    for i in range(len(atoms)):
        forces = [n["forces"][i] for n in nets]
        np.testing.assert_allclose(out["forces"][i], np.mean(forces, axis=0), atol=1e-12)
        variance = np.mean([n["forces_std"][i] ** 2 + (f - out["forces"][i]) ** 2 for n, f in zip(nets, forces)], 0)
        np.testing.assert_allclose(out["forces_std"][i], np.sqrt(variance), rtol=1e-12)
        assert out["forces_samples"][i].shape == (4, len(atoms[i]), 3)
    noise_free = two_networks.predict(atoms, samples=0)
    np.testing.assert_allclose(noise_free["energy"], mean, atol=1e-9)  # the networks' own noise-free passes
    assert np.all(noise_free["energy_std"] == 0)


def test_recalibration_calibrates_each_network_then_the_mixture(two_networks, tmp_path):
    model = copy.copy(two_networks)
    structures = read_labelled(DATA / "acac_small.xyz")
    atoms = [s.atoms for s in structures]
    factors = recalibrate(model, structures, samples=4, seed=0)
    assert len(factors["networks"]) == 2
    for net, own in zip(model.networks(), factors["networks"]):  # each as a model of one network
        assert own["forces"] > 0 and net.calibration["forces"] == own["forces"]
    out = model.predict(atoms, samples=4, seed=0)  # on the structures it was fitted on: mean z^2 = 1
    err = np.concatenate([(s.forces - f).ravel() for s, f in zip(structures, out["forces"])])
    std = np.concatenate([s.ravel() for s in out["forces_std"]])
    assert np.mean((err / std) ** 2) == pytest.approx(1.0, rel=1e-6)
    save_model(model, tmp_path / "mixed.pt")
    again = blip.load(tmp_path / "mixed.pt").predict(atoms, samples=4, seed=0)
    np.testing.assert_allclose(again["energy_std"], out["energy_std"], rtol=1e-9)


def test_factor_within_keeps_the_mixture_factor_inside_the_validation_distances():
    np.testing.assert_allclose(factor_within(0.6, [-1.0, 0.5, 0.51, 3.0], 0.5), [0.6, 0.6, 1.0, 1.0])
    np.testing.assert_allclose(factor_within(1.3, [0.0, 2.0], 1.0), [1.3, 1.3])  # a widening stays
    assert factor_within(0.6, None, 0.5) == 0.6 and factor_within(0.6, [1.0], None) == 0.6
    assert network_limit({"networks": [{"novelty_limit": 1.0}, {"novelty_limit": 2.0}]}, "forces") == 1.5
    assert network_limit({"networks": [{"novelty_limit": 1.0}, {}]}, "forces") is None
    assert network_limit({"networks": [{"energy_novelty_limit": 1.0}]}, "stress") is None


def test_beyond_the_networks_validation_distances_the_mixture_is_not_shrunk(two_networks, atoms):
    """Atoms whose (networks' mean) distance lies above the mean of the networks' novelty_limit keep
    the unshrunk mixture spread (factor max(f, 1) = 1), the others get f = 0.5; the energy follows
    the structure's largest atom distance against energy_novelty_limit; stress keeps f."""
    raw = two_networks.predict(atoms, samples=4, seed=0, novelty=True)
    nu = raw["atom_novelty"]
    limit = float(np.median(np.concatenate(nu)))
    beyond_energy = float(np.median([v.max() for v in nu]))
    model = copy.copy(two_networks)
    model.calibration = {"energy": 0.5, "forces": 0.5,
                         "networks": [{"novelty_limit": limit - 0.1, "energy_novelty_limit": beyond_energy},
                                      {"novelty_limit": limit + 0.1, "energy_novelty_limit": beyond_energy}]}
    out = model.predict(atoms, samples=4, seed=0)
    assert "atom_novelty" not in out  # only when asked for
    for v, std, std_raw in zip(nu, out["forces_std"], raw["forces_std"]):
        expected = np.where(v > limit, 1.0, 0.5)[:, None] * std_raw
        np.testing.assert_allclose(std, expected, rtol=1e-9)
    assert 0 < sum(int((v > limit).sum()) for v in nu) < sum(len(v) for v in nu)  # both kinds of atom
    expected = np.where([v.max() > beyond_energy for v in nu], 1.0, 0.5) * raw["energy_std"]
    np.testing.assert_allclose(out["energy_std"], expected, rtol=1e-9)
    np.testing.assert_allclose(out["energy"], raw["energy"], rtol=0, atol=1e-9)  # the prediction is not touched
    # scoring from raw spreads (blip bench) applies the same factors
    a = {"std": np.concatenate([s.ravel() for s in raw["forces_std"]]), "novelty": np.repeat(np.concatenate(nu), 3)}
    np.testing.assert_allclose(calibrated_std(a, model.calibration, "forces"),
                               np.concatenate([s.ravel() for s in out["forces_std"]]), rtol=1e-9)


@pytest.mark.parametrize("method", ["deterministic", "ensemble"])
def test_networks_is_only_for_sampled_methods(tmp_path, method):
    with pytest.raises(ConfigError, match="uq.networks"):
        tiny_config(tmp_path, uq={"method": method, "networks": 2})
    assert networks_of(tiny_config(tmp_path, uq={"method": "ensemble", "ensemble_size": 3})) == 3
    assert networks_of(tiny_config(tmp_path, uq={"method": "deterministic"})) == 1


def test_exported_mixture_equals_its_prediction(two_networks, tmp_path):
    """blip export of a recalibrated model file of two networks: the metatomic model's energy and
    spread are blip.Calculator's (a float32 model of a -9.4 keV structure: energies to 2e-3 eV, float32's
    last digits there; the spread, larger than 1e-3 eV, to 1e-3 relative)."""
    pytest.importorskip("metatomic.torch")
    from metatomic.torch import ModelOutput, load_atomistic_model
    from metatomic_ase import MetatomicCalculator

    from blip.export import export_model

    model = copy.copy(two_networks)
    recalibrate(model, read_labelled(DATA / "acac_small.xyz"), samples=4, seed=0)
    save_model(model, tmp_path / "mixed.pt")
    export_model(tmp_path / "mixed.pt", tmp_path / "exported.pt", samples=4, seed=2)
    calc = MetatomicCalculator(load_atomistic_model(str(tmp_path / "exported.pt")))
    atoms = ase.io.read(DATA / "acac_small.xyz", 0)
    spread = calc.run_model(atoms, {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="system")})
    ref = blip.Calculator(model, samples=4, seed=2)
    ref.calculate(atoms.copy(), ["energy"])
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(ref.results["energy"], abs=2e-3)
    assert ref.results["energy_std"] > 1e-3
    assert spread["energy_uncertainty"].block().values.item() == pytest.approx(ref.results["energy_std"], rel=1e-3)
