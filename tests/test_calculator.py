"""ASE calculator: agreement with BlipModel.predict, std vs variance, conservative forces, extxyz."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

import blip
from blip.calculator import BlipCalculator, max_atom_force_std, store_results
from blip.config import resolve
from blip.errors import CheckpointError, ConfigError, DataError

from conftest import DATA


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return blip.load(tiny_model_path)


@pytest.fixture
def atoms():
    return ase.io.read(DATA / "acac_small.xyz", 1)


def test_results_equal_predict_for_same_seed(tiny_model_path, atoms):
    calc = blip.Calculator(tiny_model_path, samples=6, seed=3)
    assert isinstance(calc, BlipCalculator)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    ref = blip.load(tiny_model_path).predict([atoms], samples=6, seed=3)
    r = calc.results
    assert energy == pytest.approx(float(ref["energy"][0]), abs=1e-9)
    np.testing.assert_allclose(forces, ref["forces"][0], rtol=0, atol=1e-9)
    assert r["energy_std"] == pytest.approx(float(ref["energy_std"][0]), abs=1e-9)
    np.testing.assert_allclose(r["forces_std"], ref["forces_std"][0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["energy_samples"], ref["energy_samples"][:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["forces_samples"], ref["forces_samples"][0], rtol=0, atol=1e-9)


def test_variance_is_std_squared_and_matches_the_samples(model, atoms):
    atoms.calc = BlipCalculator(model, samples=8, seed=0)
    atoms.get_potential_energy()
    r = atoms.calc.results
    n = len(atoms)
    assert r["energy_samples"].shape == (8,) and r["forces_samples"].shape == (8, n, 3)
    assert r["forces_std"].shape == r["forces_var"].shape == (n, 3)
    assert r["energy_std"] > 0 and np.all(r["forces_std"] > 0)
    assert r["energy_var"] == r["energy_std"] ** 2  # exactly std**2
    np.testing.assert_array_equal(r["forces_var"], r["forces_std"] ** 2)
    map_pred = model.predict([atoms], samples=0)  # uq.predict_mean: map -> the prediction is the MAP pass
    assert r["energy"] == pytest.approx(float(map_pred["energy"][0]), rel=1e-12)
    np.testing.assert_allclose(r["forces"], map_pred["forces"][0], rtol=1e-9, atol=1e-12)
    # the spread is the root mean square deviation of the samples from that prediction (K degrees of freedom)
    assert r["energy_std"] == pytest.approx(np.sqrt(np.mean((r["energy_samples"] - r["energy"]) ** 2)), rel=1e-9)
    # uq.force_std auto: one spread per component until recalibration chooses (this model was not recalibrated)
    np.testing.assert_allclose(r["forces_std"], np.sqrt(np.mean((r["forces_samples"] - r["forces"]) ** 2, axis=0)),
                               rtol=1e-9)
    assert r["energy_std"] > np.std(r["energy_samples"])  # the samples' mean is off the MAP: that counts too
    assert max_atom_force_std(r["forces_std"]) == pytest.approx(np.linalg.norm(r["forces_std"], axis=1).max())


def test_map_mode_is_the_noise_free_prediction(model, atoms):
    calc = BlipCalculator(model, samples=8, seed=0, mode="map")
    atoms.calc = calc
    e_map = atoms.get_potential_energy()
    ref = model.predict([atoms], samples=0)
    assert e_map == pytest.approx(float(ref["energy"][0]), abs=1e-9)
    r = calc.results
    assert r["energy_std"] == 0.0 and r["energy_var"] == 0.0 and not np.any(r["forces_std"])
    assert r["energy_samples"].shape == (0,) and r["forces_samples"].shape == (0, len(atoms), 3)
    calc.mode = "sample"  # switching mode drops the cached MAP results
    assert atoms.get_potential_energy() == pytest.approx(e_map, abs=1e-9)  # uq.predict_mean: map
    assert calc.results["energy_std"] > 0 and calc.results["energy_samples"].shape == (8,)
    with pytest.raises(ValueError):
        calc.mode = "mean"


def test_without_the_map_pass_the_prediction_and_the_spread_are_the_sample_mean_and_std(model, atoms):
    """map_pass=False skips the noise-free pass: the same samples, centred on their own mean."""
    model.calibration = {"energy": 1.0, "forces": 1.0}
    atoms.calc = BlipCalculator(model, samples=8, seed=2)
    atoms.get_potential_energy()
    full = dict(atoms.calc.results)
    atoms.calc = BlipCalculator(model, samples=8, seed=2, map_pass=False)
    atoms.get_potential_energy()
    spread = atoms.calc.results
    for key in ("energy_samples", "forces_samples"):
        np.testing.assert_allclose(spread[key], full[key], rtol=0, atol=1e-12)
    assert spread["energy"] == pytest.approx(float(np.mean(full["energy_samples"])), abs=1e-9)
    np.testing.assert_allclose(spread["forces"], full["forces_samples"].mean(axis=0), rtol=0, atol=1e-9)
    assert abs(spread["energy"] - full["energy"]) > 1e-9  # the sample mean is not the MAP pass
    assert spread["energy_std"] == pytest.approx(float(np.std(full["energy_samples"])), rel=1e-9)  # ddof=0
    np.testing.assert_allclose(spread["forces_std"], full["forces_samples"].std(axis=0), rtol=1e-9)


def test_given_map_values_give_the_full_prediction_without_a_noise_free_pass(model, atoms):
    """``map_values`` (the MD watch hands in its step's MAP energy and forces): the result of a full predict."""
    model.calibration = {"energy": 1.3, "forces": 1.7}
    full = model.predict([atoms], samples=8, seed=2)
    noise_free = model.predict([atoms], samples=0)
    given = model.predict([atoms], samples=8, seed=2,
                          map_values={"energy": noise_free["energy"], "forces": noise_free["forces"]})
    for key in ("energy", "energy_std", "energy_samples"):
        np.testing.assert_allclose(given[key], full[key], rtol=1e-12, atol=1e-12)
    for key in ("forces", "forces_std", "forces_samples"):
        np.testing.assert_allclose(given[key][0], full[key][0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="map_values"):
        model.predict([atoms], samples=8, seed=2, map_values={"energy": noise_free["energy"]})


def _finite_difference_forces(calc, atoms, entries, h=1e-4):
    out = []
    for i, c in entries:
        values = []
        for sign in (+1, -1):
            a = atoms.copy()
            a.positions[i, c] += sign * h
            a.calc = calc
            values.append(a.get_potential_energy())
        out.append(-(values[0] - values[1]) / (2 * h))
    return np.array(out)


@pytest.mark.parametrize("mode", ["map", "sample"])
def test_forces_are_minus_energy_gradient(model, atoms, mode):
    # float64 copy of the model: total energies ~ -9400 eV need it for finite differences.
    # A fixed seed makes every sample (and so the mean) one smooth potential.
    calc = BlipCalculator(model, samples=4, seed=7, mode=mode, dtype="float64")
    atoms.calc = calc
    forces = atoms.get_forces().copy()
    entries = [(0, 0), (3, 1), (7, 2), (12, 0), (14, 1)]
    fd = _finite_difference_forces(calc, atoms, entries)
    analytic = np.array([forces[i, c] for i, c in entries])
    np.testing.assert_allclose(fd, analytic, rtol=1e-5, atol=1e-6)


def test_extxyz_round_trip(model, atoms, tmp_path):
    atoms.calc = BlipCalculator(model, samples=5, seed=1)
    atoms.get_forces()
    r = atoms.calc.results
    plain = tmp_path / "plain.xyz"
    ase.io.write(plain, atoms)  # standard properties only
    back = ase.io.read(plain)
    assert back.get_potential_energy() == pytest.approx(r["energy"])
    store_results(atoms, samples=True)
    path = tmp_path / "with_std.xyz"
    ase.io.write(path, atoms)
    back = ase.io.read(path)
    assert back.get_potential_energy() == pytest.approx(r["energy"])
    np.testing.assert_allclose(back.get_forces(), r["forces"], atol=1e-7)
    assert back.info["energy_std"] == pytest.approx(r["energy_std"])
    assert back.info["energy_var"] == pytest.approx(r["energy_var"])
    np.testing.assert_allclose(back.arrays["forces_std"], r["forces_std"], rtol=0, atol=1e-8)  # extxyz keeps 8 decimals
    np.testing.assert_allclose(back.arrays["forces_var"], r["forces_var"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(back.info["energy_samples"], r["energy_samples"], atol=1e-6)
    fs = back.arrays["forces_samples"].reshape(len(atoms), 5, 3).transpose(1, 0, 2)
    np.testing.assert_allclose(fs, r["forces_samples"], atol=1e-7)


def test_unknown_element_is_a_data_error(model, atoms):
    atoms.numbers[0] = 14  # Si: not in the acetylacetone model
    atoms.calc = BlipCalculator(model, samples=2, seed=0)
    with pytest.raises(DataError, match="Si"):
        atoms.get_potential_energy()


def test_bad_arguments(model, tiny_model_path, tmp_path):
    with pytest.raises(ValueError):
        BlipCalculator(model, mode="ensemble")
    with pytest.raises(ValueError):
        BlipCalculator(model, samples=-1)
    with pytest.raises(CheckpointError):
        BlipCalculator(tmp_path / "missing.pt")
    assert BlipCalculator(tiny_model_path).samples == model.default_samples


def test_force_std_per_atom_or_per_component(tiny_model_path, atoms, tmp_path):
    """``uq.force_std``: "atom" pools an atom's three components (same row norms as "component");
    "auto" is per component until recalibration chooses, and the choice is saved with the model; a
    model file without the key keeps the per-component spread its calibration was fitted to."""
    from blip.data import read_labelled
    from blip.io import save_model
    from blip.uq.recalibration import recalibrate

    model = blip.load(tiny_model_path)
    assert model.config["uq"]["force_std"] == "auto" and model.force_std == "component"
    model.calibration = {"energy": 1.0, "forces": 1.7}
    component = model.predict([atoms], samples=8, seed=2)
    deviation = component["forces_samples"][0] - component["forces"][0]  # samples scaled about the MAP forces
    np.testing.assert_allclose(component["forces_std"][0], np.sqrt(np.mean(deviation ** 2, axis=0)), rtol=1e-9)
    model.config["uq"]["force_std"] = "atom"
    pooled = model.predict([atoms], samples=8, seed=2)["forces_std"][0]
    component = component["forces_std"][0]
    assert np.ptp(component, axis=1).max() > 0  # the components of an atom differ ...
    np.testing.assert_array_equal(pooled, pooled[:, :1].repeat(3, axis=1))  # ... pooled, they do not
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), np.linalg.norm(component, axis=1), rtol=1e-12)
    np.testing.assert_allclose(pooled[:, 0], np.sqrt((component ** 2).mean(axis=1)), rtol=1e-12)
    del model.config["uq"]["force_std"]  # a model file from before the key
    assert model.force_std == "component"
    model.config["uq"]["force_std"] = "auto"
    recalibrate(model, read_labelled(DATA / "acac_small.xyz"), samples=4, seed=0)
    assert model.fitted_force_std in ("atom", "component")
    save_model(model, tmp_path / "m.pt")
    assert blip.load(tmp_path / "m.pt").force_std == model.fitted_force_std
    with pytest.raises(ConfigError, match="force_std"):
        resolve({"uq": {"force_std": "norm"}})


def test_recalibration_picks_the_force_spread_of_lower_nll():
    """Errors drawn per atom with one scale for its three components favour the pooled spread when
    the per-component stds are noisy estimates of it; errors with a scale per component favour
    the per-component spread when the stds follow those scales."""
    from blip.uq.recalibration import choose_force_std

    rng = np.random.default_rng(0)
    atom_scale = rng.uniform(0.05, 0.5, size=(400, 1)).repeat(3, axis=1)
    err = atom_scale * rng.standard_normal((400, 3))
    noisy = atom_scale * np.sqrt(rng.chisquare(3, size=(400, 3)) / 3)  # K = 3 draws per component
    arrays = {"ref": err.ravel(), "pred": np.zeros(1200), "std": noisy.ravel()}
    assert choose_force_std(arrays) == "atom"
    component_scale = rng.uniform(0.05, 0.5, size=(400, 3))
    err = component_scale * rng.standard_normal((400, 3))
    arrays = {"ref": err.ravel(), "pred": np.zeros(1200), "std": component_scale.ravel()}
    assert choose_force_std(arrays) == "component"
