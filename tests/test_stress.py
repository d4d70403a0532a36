"""Stress: predictions, ASE's convention, labels, evaluation, recalibration and training on them.

The finite-difference and rotation checks of the stress for every backbone are in
tests/test_physics.py; here a tiny PaiNN trained on Lennard-Jones-labelled Si cells.
"""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError

import blip
from blip import config
from blip.data import read_labelled
from blip.evaluate import evaluate_structures
from blip.train.loop import Trainer
from conftest import DATA, lj_si_cells, train_lj_si


def test_stress_labels_are_read_as_3x3_in_ase_convention(lj_si_files):
    structures = read_labelled(lj_si_files / "test.xyz")
    atoms = ase.io.read(lj_si_files / "test.xyz", 0)
    voigt = atoms.get_stress()  # ASE: xx, yy, zz, yz, xz, xy
    s = structures[0].stress
    assert s.shape == (3, 3)
    np.testing.assert_allclose([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], voigt)
    np.testing.assert_allclose(s, s.T)
    assert read_labelled(DATA / "acac_small.xyz")[0].stress is None  # open: never a stress


def test_calculator_stress_is_ases_numerical_stress(lj_si_model):
    atoms = lj_si_cells(1, seed=5)[0]
    atoms.calc = blip.Calculator(lj_si_model, mode="map")
    from ase.calculators.fd import calculate_numerical_stress

    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(atoms.get_stress(), numerical, rtol=0, atol=1e-7)
    assert np.abs(numerical).max() > 1e-4


def test_sampled_stress_has_a_spread_and_its_keys(lj_si_model):
    atoms = lj_si_cells(1, seed=6)[0]
    atoms.calc = blip.Calculator(lj_si_model, samples=6, seed=3)
    stress = atoms.get_stress()
    r = atoms.calc.results
    assert r["stress_samples"].shape == (6, 6) and stress.shape == (6,)
    assert np.all(r["stress_std"] > 0)
    np.testing.assert_array_equal(r["stress_var"], r["stress_std"] ** 2)
    # the prediction is the noise-free pass, the spread the samples' root mean square deviation from it
    map_stress = lj_si_model.predict([atoms], samples=0)["stress"][0]
    np.testing.assert_allclose(stress, map_stress, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r["stress_std"], np.sqrt(np.mean((r["stress_samples"] - stress) ** 2, axis=0)),
                               rtol=1e-12)


def test_stress_is_the_same_when_the_noise_free_pass_is_a_replica_of_the_sampled_one(lj_si_model, monkeypatch):
    """On a GPU ``predict`` folds the noise-free pass into the sampled one (``folds_map_pass``)."""
    cells = lj_si_cells(2, seed=8)
    own_pass = lj_si_model.predict(cells, samples=3, seed=5)
    monkeypatch.setattr(blip.predictor.BlipModel, "folds_map_pass", property(lambda self: True))
    folded = lj_si_model.predict(cells, samples=3, seed=5)
    for key in ("stress", "stress_std", "stress_samples", "energy"):
        np.testing.assert_allclose(folded[key], own_pass[key], rtol=0, atol=1e-10)


def test_open_structures_report_no_stress(lj_si_model):
    molecule = ase.Atoms("Si3", positions=[[0, 0, 0], [2.3, 0, 0], [0, 2.3, 0.2]])
    molecule.calc = blip.Calculator(lj_si_model, samples=2, seed=0)
    assert np.isfinite(molecule.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError):
        molecule.get_stress()
    cell = lj_si_cells(1, seed=7)[0]
    out = lj_si_model.predict([molecule, cell], samples=2, seed=0)
    assert np.isnan(out["stress"][0]).all() and np.isfinite(out["stress"][1]).all()
    assert "stress" not in lj_si_model.predict([molecule], samples=2, seed=0)


def test_evaluate_scores_stress_and_recalibration_fits_its_factor(lj_si_model, lj_si_files):
    structures = read_labelled(lj_si_files / "test.xyz")
    metrics, arrays = evaluate_structures(lj_si_model, structures, samples=4, seed=0)
    assert metrics["stress"]["n"] == 6 * len(structures)
    ref = np.concatenate([[s.stress[0, 0], s.stress[1, 1], s.stress[2, 2], s.stress[1, 2], s.stress[0, 2],
                           s.stress[0, 1]] for s in structures])
    np.testing.assert_allclose(arrays["stress"]["ref"], ref)
    pred = lj_si_model.predict([s.atoms for s in structures], samples=4, seed=0)["stress"].ravel()
    assert metrics["stress"]["rmse"] == pytest.approx(np.sqrt(np.mean((ref - pred) ** 2)), rel=1e-9)

    from blip.uq.recalibration import fit_scale, recalibrate

    raw = arrays["stress"]["std"]
    for fraction in (0.0, 0.2):  # uq.stress_std_floor: none, and 20 % of the stress RMSE (large, so it shows)
        cfg = {**lj_si_model.config, "uq": {**lj_si_model.config["uq"], "stress_std_floor": fraction}}
        model = blip.predictor.BlipModel(lj_si_model.members, cfg, lj_si_model.summary)
        floor = fraction * metrics["stress"]["rmse"]
        expected = fit_scale(ref - pred, raw, floor)
        factors = recalibrate(model, structures, samples=4, seed=0)
        assert factors["stress"] == pytest.approx(expected, rel=1e-6)
        assert factors.get("stress_floor", 0.0) == pytest.approx(floor, rel=1e-9)
        scaled = model.predict([structures[0].atoms], samples=4, seed=0)["stress_std"][0]
        np.testing.assert_allclose(scaled, np.sqrt((expected * raw[:6]) ** 2 + floor ** 2), rtol=1e-6)
    assert expected != pytest.approx(fit_scale(ref - pred, raw), rel=1e-3)  # the floor changed the fit


def test_stress_components_zero_by_symmetry_do_not_steer_the_stress_factor():
    """Rounding-level residuals and spreads (off-diagonal stress of axis-aligned cubic cells) would
    pull the plain factor far from the one of the other components; with the floor they do not."""
    from blip.uq.recalibration import fit_scale

    rng = np.random.default_rng(0)
    sigma = rng.uniform(1e-3, 3e-3, 600)
    err = 2.0 * sigma * rng.standard_normal(600)  # the true factor is 2
    tiny_sigma = rng.uniform(1e-9, 1e-8, 200)
    tiny_err = 300.0 * tiny_sigma * rng.standard_normal(200)  # ratios of rounding noise
    err_all, sigma_all = np.concatenate([err, tiny_err]), np.concatenate([sigma, tiny_sigma])
    plain = fit_scale(err_all, sigma_all)
    floored = fit_scale(err_all, sigma_all, 0.01 * np.sqrt(np.mean(err_all ** 2)))
    assert plain > 50.0
    assert floored == pytest.approx(2.0, rel=0.1)


def test_blip_calibrate_reads_stress_under_the_models_key_and_fits_its_factor_and_floor(lj_si_model, lj_si_files,
                                                                                       tmp_path, capsys):
    from blip.cli import main
    from blip.io import save_model

    cells = ase.io.read(lj_si_files / "test.xyz", ":")
    for atoms in cells:  # the stress under another key, as some data sets store it
        atoms.info["virial_stress"] = atoms.get_stress()
        atoms.calc.results.pop("stress")
    ase.io.write(tmp_path / "valid.xyz", cells, format="extxyz")
    cfg = {**lj_si_model.config, "data": {**lj_si_model.config["data"], "stress_key": "virial_stress"},
           "uq": {**lj_si_model.config["uq"], "stress_std_floor": 0.01}}
    save_model(blip.predictor.BlipModel(lj_si_model.members, cfg, lj_si_model.summary), tmp_path / "model.pt")
    assert main(["calibrate", str(tmp_path / "model.pt"), str(tmp_path / "valid.xyz"), "-o",
                 str(tmp_path / "calibrated.pt"), "--samples", "4", "--quiet"]) == 0
    calibration = blip.load(tmp_path / "calibrated.pt").calibration
    assert calibration["stress"] > 0 and calibration["stress_floor"] > 0
    assert f"stress {calibration['stress']:.4g}" in capsys.readouterr().out


def test_training_on_stress_labels_fits_them(lj_si_files, tmp_path):
    structures = read_labelled(lj_si_files / "test.xyz")

    def stress_rmse(model):
        return evaluate_structures(model, structures, samples=0)[0]["stress"]["rmse"]

    # 12 epochs: after 6 the tiny model's stress error still swings with harmless numerical changes
    # (without stress labels 0.025-0.049 eV/A^3 under a 1e-4-level change of the feature whitening);
    # after 12 it is 0.030-0.036 without and 0.0028-0.0030 with them, for both variants
    without = train_lj_si(lj_si_files, tmp_path, stress_weight=0.0, epochs=12)
    with_stress = train_lj_si(lj_si_files, tmp_path, stress_weight=1e4, epochs=12)
    assert stress_rmse(with_stress) < 0.3 * stress_rmse(without)


def test_stress_weight_without_stress_labels_is_a_config_error(tmp_path):
    from blip.errors import ConfigError
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, training={"stress_weight": 1.0})
    with pytest.raises(ConfigError, match="stress label"):
        Trainer(cfg, progress=False).run()


def test_a_4096_atom_cell_with_samples_matches_its_8_atom_unit(lj_si_model, monkeypatch):
    # A rattled 8-atom cell tiled 8 x 8 x 8: every image of an atom has that atom's MAP force,
    # the energy is 512 x the unit's, the stress the unit's. K = 4 samples run one replica per
    # pass (replica groups bound the memory) and equal those of all 4 replicas in one pass.
    import blip.predictor as predictor

    unit = lj_si_cells(1, seed=9)[0]
    big = unit.repeat((8, 8, 8))
    ref = lj_si_model.predict([unit], samples=0)
    out = lj_si_model.predict([big], samples=4, seed=1)
    np.testing.assert_allclose(out["forces"][0], np.tile(ref["forces"][0], (512, 1)), rtol=0, atol=1e-9)
    assert out["energy"][0] == pytest.approx(512 * ref["energy"][0], rel=1e-12)
    np.testing.assert_allclose(out["stress"][0], ref["stress"][0], rtol=0, atol=1e-10)
    assert out["forces_samples"][0].shape == (4, 4096, 3) and np.all(out["forces_std"][0] > 0)
    monkeypatch.setattr(predictor, "MAX_EDGES_PER_PASS", 2 * predictor.MAX_EDGES_PER_PASS * 40)
    grouped = lj_si_model.predict([big], samples=4, seed=1)
    np.testing.assert_allclose(grouped["forces_samples"][0], out["forces_samples"][0], rtol=0, atol=1e-10)
