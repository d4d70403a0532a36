"""Novelty widening: each atom's force spread grows with its log feature distance (``uq.novelty_widening``),
each energy's with its atoms' largest (``uq.energy_novelty_widening``)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read
from conftest import DATA
from scipy.spatial.transform import Rotation

import blip
from blip.bench.runner import add_sigma_ratios, recalibrated_std
from blip.config import resolve
from blip.errors import ConfigError
from blip.predictor import novelty_widening
from blip.uq.recalibration import (fit_novelty_widening, fit_structure_floor, floored_std, recalibrate, structure_floor,
                                   unfloored_std, widening_formula)


def test_fit_recovers_a_planted_widening_and_never_shrinks():
    """Errors drawn with spread 2 sigma exp(0.6 nu) give back s ~ 2 and b ~ 0.6; errors that do not
    grow with nu give b = 0 (the bound), not a negative b that would shrink the spread far out."""
    rng = np.random.default_rng(0)
    n = 20000
    sigma = rng.uniform(0.05, 0.2, n)
    nu = rng.normal(0.0, 1.0, n)
    err = rng.normal(0.0, 2.0 * sigma * np.exp(0.6 * nu))
    s, b = fit_novelty_widening(err, sigma, nu)
    assert s == pytest.approx(2.0, rel=0.05) and b == pytest.approx(0.6, abs=0.03)
    shrinking = rng.normal(0.0, 2.0 * sigma * np.exp(-0.6 * nu))
    s, b = fit_novelty_widening(shrinking, sigma, nu)
    assert b == 0.0
    # with a floor (uq.novelty_widening_fit): the planted slope where it is steeper, else the floor
    assert fit_novelty_widening(err, sigma, nu, b_min=0.1)[1] == pytest.approx(0.6, abs=0.03)
    assert fit_novelty_widening(shrinking, sigma, nu, b_min=0.1)[1] == 0.1


def test_a_set_b_is_the_floor_of_a_fitted_one_with_novelty_widening_fit():
    """uq.novelty_widening_fit: errors that grow with nu faster than the set b give the fitted slope,
    with the factor fitted together with it; without the flag the set b stays."""
    from blip.uq.recalibration import _widening

    rng = np.random.default_rng(1)
    n = 20000
    sigma, nu = rng.uniform(0.05, 0.2, n), rng.normal(0.0, 1.0, n)
    a = {"ref": rng.normal(0.0, 2.0 * sigma * np.exp(0.6 * nu)), "pred": np.zeros(n), "std": sigma, "novelty": nu}
    fitted = _widening(a, 0.1, "forces", fit_above=True)
    assert fitted["forces_novelty"] == pytest.approx(0.6, abs=0.03)
    assert fitted["forces"] * np.exp(-0.6 * np.mean(nu)) == pytest.approx(2.0, rel=0.05)
    assert _widening(a, 0.1, "forces")["forces_novelty"] == 0.1


def test_novelty_is_invariant_and_grows_on_a_distorted_structure(tiny_model_path):
    """A fixed-seed sample's per-atom novelty is unchanged by rotating and translating the structure
    and is larger on a strongly distorted copy than on the structure itself."""
    model = blip.load(tiny_model_path)
    atoms = read(DATA / "acac_small.xyz", index=0)
    base = model.predict([atoms], samples=4, seed=3, novelty=True)["atom_novelty"][0]
    moved = atoms.copy()
    moved.positions = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).apply(moved.positions) + [1.5, -2.0, 0.7]
    np.testing.assert_allclose(model.predict([moved], samples=4, seed=3, novelty=True)["atom_novelty"][0], base, atol=1e-4)
    distorted = atoms.copy()
    distorted.rattle(0.4, seed=1)
    assert model.predict([distorted], samples=4, seed=3, novelty=True)["atom_novelty"][0].mean() > base.mean() + 0.5
    assert "atom_novelty" not in model.predict([atoms], samples=0, novelty=True)  # the noise-free pass has none
    assert "atom_novelty" not in model.predict([atoms], samples=4, seed=3)  # only when asked


def test_predict_widens_each_atoms_force_spread_by_its_factor(tiny_model_path):
    """With ``forces_novelty`` b and ``novelty_centre`` nu_0 in the calibration, each atom's force std
    (and its samples' deviation) is the unwidened one times exp(b (nu - nu_0)); energies are unchanged.
    With ``energy_novelty`` the energy spreads are widened by their structure's factor, forces not."""
    model = blip.load(tiny_model_path)
    model.config["uq"]["force_std"] = "component"
    atoms = read(DATA / "acac_small.xyz", index=1)
    model.calibration = {"energy": 1.3, "forces": 1.7}
    plain = model.predict([atoms], samples=4, seed=5, novelty=True)
    model.calibration = {"energy": 1.3, "forces": 1.7, "forces_novelty": 0.4, "novelty_centre": -1.0}
    wide = model.predict([atoms], samples=4, seed=5)
    factor = np.exp(0.4 * (plain["atom_novelty"][0] + 1.0))
    np.testing.assert_allclose(wide["forces_std"][0], plain["forces_std"][0] * factor[:, None], rtol=1e-9)
    np.testing.assert_allclose(wide["energy_std"], plain["energy_std"], rtol=1e-12)
    assert novelty_widening(plain["atom_novelty"], {"energy": 1.0, "forces": 1.0}) is None
    # energy_novelty b_E: each structure's energy spread and samples x exp(b_E (its atoms' largest nu - c))
    two = [atoms, read(DATA / "acac_small.xyz", index=2)]
    model.calibration = {"energy": 1.3, "forces": 1.7}
    plain = model.predict(two, samples=4, seed=5, novelty=True)
    model.calibration = {"energy": 1.3, "forces": 1.7, "energy_novelty": 0.3, "energy_novelty_centre": -0.5}
    wide = model.predict(two, samples=4, seed=5)
    factor = np.exp(0.3 * (np.array([v.max() for v in plain["atom_novelty"]]) + 0.5))
    np.testing.assert_allclose(wide["energy_std"], plain["energy_std"] * factor, rtol=1e-9)
    # deviations are differences of energies of size |E|: they carry rounding of about eps |E|
    rounding = 100 * np.finfo(np.float64).eps * np.abs(plain["energy"]).max()
    np.testing.assert_allclose(wide["energy_samples"] - wide["energy"],
                               (plain["energy_samples"] - plain["energy"]) * factor, rtol=1e-9, atol=rounding)
    np.testing.assert_allclose(wide["energy"], plain["energy"], rtol=0, atol=0)
    np.testing.assert_allclose(wide["forces_std"][1], plain["forces_std"][1], rtol=1e-12)


def test_recalibration_widens_by_a_set_or_fitted_b_only_when_asked(tiny_model_path):
    """``recalibrate`` with a number b keeps it and fits the force factor of the widened spreads; with
    true it fits b >= 0; false, or a config without the key (a model file from before it), keeps the
    plain factors; the bench's recalibrated spread applies both."""
    from blip.data import read_labelled
    from blip.evaluate import evaluate_structures
    from blip.uq.recalibration import fit_scale

    structures = read_labelled(DATA / "acac_small.xyz")
    model = blip.load(tiny_model_path)
    model.config["uq"]["force_std"] = "component"
    model.calibration = {"energy": 1.0, "forces": 1.0}
    f = evaluate_structures(model, structures, samples=4, seed=0)[1]["forces"]
    e = evaluate_structures(model, structures, samples=4, seed=0)[1]["energy"]
    np.testing.assert_allclose(e["novelty"], [v.max() for v in model.predict(
        [s.atoms for s in structures], samples=4, seed=0, novelty=True)["atom_novelty"]], rtol=1e-12)
    model.config["uq"].update(novelty_widening=0.25, energy_novelty_widening=0.4, novelty_widening_fit=False)
    factors = recalibrate(model, structures, samples=4, seed=0)
    for target, a, b, keys in (("forces", f, 0.25, ("forces_novelty", "novelty_centre")),
                               ("energy", e, 0.4, ("energy_novelty", "energy_novelty_centre"))):
        centre = float(np.mean(a["novelty"]))
        assert factors[keys[0]] == b and factors[keys[1]] == pytest.approx(centre, rel=1e-9)
        wide = a["std"] * np.exp(b * (a["novelty"] - centre))
        floor = factors["forces_floor"] if target == "forces" else 0.0
        assert factors[target] == pytest.approx(fit_scale(a["ref"] - a["pred"], wide, floor), rel=1e-9)
        assert factors[target] != pytest.approx(fit_scale(a["ref"] - a["pred"], a["std"], floor), rel=1e-3)
    model.config["uq"].update(novelty_widening=True, energy_novelty_widening=True)
    factors = recalibrate(model, structures, samples=4, seed=0)
    assert factors["forces_novelty"] >= 0.0 and np.isfinite(factors["novelty_centre"])
    assert factors["energy_novelty"] >= 0.0 and np.isfinite(factors["energy_novelty_centre"])
    fitted = factors["forces_novelty"]  # a set b with novelty_widening_fit is the floor of the fit
    model.config["uq"].update(novelty_widening=fitted + 0.2, energy_novelty_widening=0.4, novelty_widening_fit=True)
    factors = recalibrate(model, structures, samples=4, seed=0)
    assert factors["forces_novelty"] == pytest.approx(fitted + 0.2, abs=1e-6)
    assert factors["energy_novelty"] == 0.4  # energies keep their set b
    model.config["uq"].update(novelty_widening=False, energy_novelty_widening=False, structure_floor=False)
    assert set(recalibrate(model, structures, samples=4, seed=0)) == {"energy", "forces", "forces_floor"}
    del model.config["uq"]["novelty_widening"], model.config["uq"]["energy_novelty_widening"]
    assert set(recalibrate(model, structures, samples=4, seed=0)) == {"energy", "forces", "forces_floor"}
    a = {"std": np.array([1.0, 2.0]), "novelty": np.array([0.0, 1.0])}
    scales = {"forces": 2.0, "forces_novelty": 0.5, "novelty_centre": 0.5}
    np.testing.assert_allclose(recalibrated_std(a, "forces", scales), [2.0 * np.exp(-0.25), 4.0 * np.exp(0.25)])
    np.testing.assert_allclose(recalibrated_std(a, "energy", {"energy": 3.0}), [3.0, 6.0])
    energy = {"energy": 3.0, "energy_novelty": 0.5, "energy_novelty_centre": 0.5}
    np.testing.assert_allclose(recalibrated_std(a, "energy_per_atom", energy),
                               [3.0 * np.exp(-0.25), 6.0 * np.exp(0.25)])
    rows = [{"test_set": t, "uq_target": "forces", "forces_mean_std": m, "forces_mean_std_recal": w}
            for t, m, w in (("low", 1.0, 2.0), ("high", 3.0, 12.0))]
    add_sigma_ratios(rows, "low")  # the widening changes the ratio the recalibrated spreads give
    assert (rows[1]["sigma_ratio"], rows[1]["sigma_ratio_recal"]) == (3.0, 6.0)
    from blip.report import recalibration_markdown

    forces = {"ref": np.zeros(2), "pred": np.array([0.1, -0.2]), "std": recalibrated_std(a, "forces", scales),
              "novelty": a["novelty"]}
    _, pairs = recalibration_markdown({"forces": forces}, scales)
    np.testing.assert_allclose(pairs["forces"]["before"][1], a["std"])  # the report undoes the widening too
    assert resolve({})["uq"]["novelty_widening"] == 0.1  # b's floor, measured on the benchmarks
    assert resolve({})["uq"]["novelty_widening_fit"] is True
    assert resolve({})["uq"]["energy_novelty_widening"] == 0.2
    # fine-tuning CHGNet: its energy spreads, already too wide, lost 0.1-0.5 nats with it
    assert resolve({"model": {"backbone": "chgnet", "pretrained": True}})["uq"]["energy_novelty_widening"] is False
    # MACE: b_E fitted on the validation split (its noise-free trained energies: a fixed 0.2 cost 0.13
    # nats in distribution, the fitted one nothing there and 2 nats far out)
    assert resolve({"model": {"backbone": "mace"}})["uq"]["energy_novelty_widening"] is True
    assert resolve({"model": {"backbone": "mace"}, "uq": {"energy_novelty_widening": 0.3}})["uq"][
        "energy_novelty_widening"] == 0.3
    assert resolve({"model": {"backbone": "chgnet", "pretrained": True}})["uq"]["novelty_widening"] == 0.1
    # model files written before the energy key get their backbone's (and fine-tuning's) default
    from blip.io import _with_new_keys

    assert _with_new_keys({"model": {"backbone": "painn"}, "uq": {}})["uq"]["energy_novelty_widening"] == 0.2
    assert _with_new_keys({"model": {"backbone": "mace"}, "uq": {}})["uq"]["energy_novelty_widening"] is True
    assert _with_new_keys({"model": {"backbone": "chgnet", "pretrained": True}, "uq": {}})["uq"][
        "energy_novelty_widening"] is False
    for value in (True, False, 0.3):
        assert resolve({"uq": {"novelty_widening": value}})["uq"]["novelty_widening"] == value
    for bad in (-0.1, "yes"):
        with pytest.raises(ConfigError, match="novelty_widening"):
            resolve({"uq": {"novelty_widening": bad}})


def test_widening_formula_reads_without_double_signs():
    assert widening_formula(0.1, -1.12) == "exp(0.1 (novelty + 1.12))"
    assert widening_formula(0.2, 0.5, "nu_max") == "exp(0.2 (nu_max - 0.5))"


def test_spreads_grow_faster_beyond_the_validation_range(tiny_model_path):
    """``uq.novelty_beyond`` b2: recalibration stores the validation split's largest distance as the
    limit and leaves the factor's fit unchanged (nothing lies beyond it there); predict multiplies the
    force spread of atoms beyond the limit by exp(b2 (nu - limit)) on top of exp(b (nu - nu_0)), and
    leaves atoms within it alone; the energy's works the same with each structure's largest nu."""
    from blip.data import read_labelled
    from blip.evaluate import evaluate_structures

    structures = read_labelled(DATA / "acac_small.xyz")
    model = blip.load(tiny_model_path)
    model.config["uq"].update(force_std="component", novelty_widening=0.1, energy_novelty_widening=0.2,
                              novelty_beyond=0.3, energy_novelty_beyond=0.5,
                              force_std_floor=0.0, structure_floor=False)  # exact ratios below; floors: own tests
    factors = recalibrate(model, structures, samples=4, seed=0)
    model.calibration = {"energy": 1.0, "forces": 1.0}
    arrays = evaluate_structures(model, structures, samples=4, seed=0)[1]
    assert factors["forces_novelty_beyond"] == 0.3 and factors["energy_novelty_beyond"] == 0.5
    assert factors["novelty_limit"] == pytest.approx(arrays["forces"]["novelty"].max(), rel=1e-12)
    assert factors["energy_novelty_limit"] == pytest.approx(arrays["energy"]["novelty"].max(), rel=1e-12)
    model.config["uq"].update(novelty_beyond=False, energy_novelty_beyond=False)
    without = recalibrate(model, structures, samples=4, seed=0)
    assert "novelty_limit" not in without and "energy_novelty_limit" not in without
    assert (factors["forces"], factors["energy"]) == (without["forces"], without["energy"])
    # predict: the hinge acts beyond the limit only (a limit inside this structure's range)
    atoms = read(DATA / "acac_small.xyz", index=1)
    model.calibration = dict(without)
    plain = model.predict([atoms], samples=4, seed=5, novelty=True)
    nu = plain["atom_novelty"][0]
    limit = float(np.median(nu))
    model.calibration = {**without, "forces_novelty_beyond": 0.3, "novelty_limit": limit,
                         "energy_novelty_beyond": 0.5, "energy_novelty_limit": float(nu.max()) - 0.2}
    wide = model.predict([atoms], samples=4, seed=5)
    extra = np.exp(0.3 * np.maximum(0.0, nu - limit))
    assert np.sum(extra > 1.0) >= 2 and np.sum(extra == 1.0) >= 2
    np.testing.assert_allclose(wide["forces_std"][0], plain["forces_std"][0] * extra[:, None], rtol=1e-9)
    np.testing.assert_allclose(wide["energy_std"], plain["energy_std"] * np.exp(0.5 * 0.2), rtol=1e-9)
    assert novelty_widening([nu], {"energy": 1.0, "forces": 1.0, "forces_novelty_beyond": 0.3,
                                   "novelty_limit": limit})[0] == pytest.approx(extra, rel=1e-12)
    assert resolve({})["uq"]["novelty_beyond"] == 0.2 and resolve({})["uq"]["energy_novelty_beyond"] == 0.2
    assert resolve({"uq": {"novelty_beyond": False}})["uq"]["novelty_beyond"] is False
    for bad in (True, -0.1, "yes"):
        with pytest.raises(ConfigError, match="novelty_beyond"):
            resolve({"uq": {"novelty_beyond": bad}})


def test_structure_floor_fit_finds_a_planted_floor_and_only_widens():
    """Structures whose errors grow with their atoms' mean distance m faster than the calibrated spread
    give back a floor growing with m (c > 0, b near the planted 1); errors the spread already
    describes give at most a negligible floor and spreads too wide none (c = 0): it only widens."""
    rng = np.random.default_rng(0)
    n_struct, per = 400, 30
    m = np.repeat(rng.normal(0.0, 0.5, n_struct), per)
    std = rng.uniform(0.01, 0.03, n_struct * per)
    floor_true = 0.05 * np.exp(1.0 * (m - m.mean()))
    err = rng.normal(0.0, np.sqrt(std ** 2 + floor_true ** 2))
    fitted = fit_structure_floor(err, std, m)
    assert fitted["forces_structure_floor"] == pytest.approx(0.05, rel=0.1)
    assert fitted["structure_floor_novelty"] == pytest.approx(1.0, abs=0.1)
    assert fitted["structure_floor_limit"] == pytest.approx(m.max()) and fitted["structure_floor_centre"] == pytest.approx(m.mean())
    described = rng.normal(0.0, std)  # at most a floor far below every spread (sampling noise)
    assert np.max(structure_floor(m, {"energy": 1.0, "forces": 1.0, **fit_structure_floor(described, std, m)})) < 0.004
    assert fit_structure_floor(described, 10 * std, m)["forces_structure_floor"] == 0.0  # spreads too wide: none


def test_structure_floor_stops_growing_beyond_the_validation_range_and_round_trips():
    """The floor grows as exp(b (m - centre)) up to ``limit`` and is flat beyond; floored_std adds it
    in quadrature to forces only and unfloored_std takes it (and the constant floor) off again."""
    cal = {"energy": 1.0, "forces": 1.0, "forces_floor": 0.002, "forces_structure_floor": 0.01,
           "structure_floor_novelty": 0.8, "structure_floor_centre": -1.0, "structure_floor_limit": 0.5}
    m = np.array([-2.0, -1.0, 0.5, 3.0])
    expected = 0.01 * np.exp(0.8 * (np.minimum(m, 0.5) + 1.0))
    np.testing.assert_allclose(structure_floor(m, cal), expected, rtol=1e-12)
    assert structure_floor(3.0, cal) == pytest.approx(structure_floor(0.5, cal))
    std = np.array([0.03, 0.001, 0.2, 0.0])
    wide = floored_std(std, cal, "forces", m)
    np.testing.assert_allclose(wide, np.sqrt(std ** 2 + 0.002 ** 2 + expected ** 2), rtol=1e-12)
    np.testing.assert_allclose(unfloored_std(wide, cal, "forces", m), std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(floored_std(std, cal, "stress", m), std)  # stress has its own floor only
    np.testing.assert_allclose(floored_std(std, cal, "forces"), np.sqrt(std ** 2 + 0.002 ** 2))  # no m: none
    np.testing.assert_allclose(structure_floor(m, {"energy": 1.0, "forces": 1.0}), 0.0)  # model files before it


def test_auto_structure_floor_is_off_for_crystals_only(lj_si_model, lj_si_files):
    """``uq.structure_floor: auto`` (the default) fits the floor unless the model was trained on periodic
    crystals; true or false set by hand win. A model trained on Si cells recalibrates without it, and
    with it when asked."""
    import copy
    from dataclasses import replace

    from blip.backbones.base import DatasetSummary
    from blip.build import auto_settings, uses_structure_floor
    from blip.data import read_labelled
    from blip.uq.recalibration import STRUCTURE_FLOOR_KEYS

    molecules = DatasetSummary(elements=[1, 6, 8])
    crystals = replace(molecules, periodic=True)
    auto = resolve({})
    assert auto["uq"]["structure_floor"] == "auto"
    assert uses_structure_floor(auto, molecules) and not uses_structure_floor(auto, crystals)
    assert auto_settings(auto, molecules)["structure_floor"] == "on"  # what blip train prints
    assert auto_settings(auto, crystals)["structure_floor"] == "off"
    assert uses_structure_floor(resolve({}, ["uq.structure_floor=true"]), crystals)
    assert not uses_structure_floor(resolve({}, ["uq.structure_floor=false"]), molecules)
    assert not uses_structure_floor(resolve({"model": {"backbone": "chgnet", "pretrained": True}}), molecules)
    with pytest.raises(ConfigError, match="structure_floor"):
        resolve({}, ["uq.structure_floor=sometimes"])
    assert lj_si_model.summary.periodic and lj_si_model.config["uq"]["structure_floor"] == "auto"
    cells = read_labelled(lj_si_files / "test.xyz")
    model = copy.deepcopy(lj_si_model)
    factors = recalibrate(model, cells, samples=4, seed=0)
    assert "forces_floor" in factors and not set(STRUCTURE_FLOOR_KEYS) & set(factors)
    model.config["uq"]["structure_floor"] = True
    assert set(STRUCTURE_FLOOR_KEYS) <= set(recalibrate(model, cells, samples=4, seed=0))


def test_predict_adds_each_structures_floor_and_keeps_it_invariant(tiny_model_path):
    """A calibration with a structure floor adds, to every force spread of a structure, the floor of
    its atoms' mean distance; it is the same after rotating, translating and permuting the atoms."""
    model = blip.load(tiny_model_path)
    model.config["uq"]["force_std"] = "component"
    two = [read(DATA / "acac_small.xyz", index=1), read(DATA / "acac_small.xyz", index=2)]
    base = {"energy": 1.3, "forces": 1.7, "forces_floor": 0.003}
    model.calibration = dict(base)
    plain = model.predict(two, samples=4, seed=5, novelty=True)
    means = [float(v.mean()) for v in plain["atom_novelty"]]
    floor = {"forces_structure_floor": 0.02, "structure_floor_novelty": 1.2,
             "structure_floor_centre": means[0], "structure_floor_limit": max(means) + 1.0}
    model.calibration = {**base, **floor}
    wide = model.predict(two, samples=4, seed=5)
    for k in range(2):
        extra = 0.02 * np.exp(1.2 * (means[k] - means[0]))
        np.testing.assert_allclose(wide["forces_std"][k], np.sqrt(plain["forces_std"][k] ** 2 + extra ** 2), rtol=1e-9)
        np.testing.assert_allclose(wide["forces_samples"][k], plain["forces_samples"][k], rtol=0, atol=0)
    np.testing.assert_allclose(wide["energy_std"], plain["energy_std"], rtol=1e-12)
    moved = two[0][::-1]  # atoms permuted
    moved.positions = Rotation.from_euler("xyz", [0.4, 1.0, -0.7]).apply(moved.positions) + [2.0, 0.5, -1.0]
    again = model.predict([moved], samples=4, seed=5, novelty=True)
    assert float(again["atom_novelty"][0].mean()) == pytest.approx(means[0], abs=1e-4)
    np.testing.assert_allclose(np.linalg.norm(again["forces_std"][0], axis=1)[::-1],
                               np.linalg.norm(wide["forces_std"][0], axis=1), rtol=2e-3)
