"""Baselines under the same API: deterministic, MC dropout, ensemble (and BLIP), plus recalibration."""

from __future__ import annotations

import copy
import json
import math

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

import blip
from blip.cli import main
from blip.io import save_model
from blip.train.loop import Trainer
from blip.uq.recalibration import fit_scale
from conftest import DATA, tiny_config

METHODS = ("blip", "deterministic", "mc_dropout", "ensemble")
PRED_KEYS = {"energy", "energy_std", "forces", "forces_std", "energy_samples", "forces_samples"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """method -> path of a tiny PaiNN model.pt trained for 2 epochs on 16 acac structures."""
    paths = {}
    for method in METHODS:
        cfg = tiny_config(tmp_path_factory.mktemp(method), uq={"method": method, "samples": 3,
                                                               "ensemble_size": 2},
                          data={"max_train": 16}, training={"epochs": 2})
        Trainer(cfg, progress=False).run()
        paths[method] = cfg["output_dir"] + "/model.pt"
    return paths


@pytest.fixture(scope="module")
def atoms():
    return ase.io.read(DATA / "acac_small.xyz", ":")


@pytest.mark.parametrize("method", METHODS)
def test_python_predict_contract_is_the_same_for_every_method(trained, atoms, method):
    model = blip.load(trained[method])
    assert model.method == method
    assert len(model.members) == (2 if method == "ensemble" else 1)
    out = model.predict(atoms, samples=3, seed=0)
    assert set(out) == PRED_KEYS
    n = len(atoms)
    assert out["energy"].shape == out["energy_std"].shape == (n,)
    assert [f.shape for f in out["forces"]] == [(len(a), 3) for a in atoms]
    assert [f.shape for f in out["forces_std"]] == [(len(a), 3) for a in atoms]
    # K: the requested samples; an ensemble's members; one pass for the deterministic model
    k = {"blip": 3, "mc_dropout": 3, "ensemble": 2, "deterministic": 1}[method]
    assert out["energy_samples"].shape == (k, n)
    assert [f.shape for f in out["forces_samples"]] == [(k, len(a), 3) for a in atoms]
    assert np.all(np.isfinite(out["energy"])) and np.all(out["energy_std"] >= 0)
    if method == "deterministic":
        assert np.all(out["energy_std"] == 0) and all(np.all(s == 0) for s in out["forces_std"])
    else:
        assert np.all(out["energy_std"] > 0) and all(np.all(s > 0) for s in out["forces_std"])
        # std: the root mean square deviation of the samples from the prediction (the MAP pass)
        deviation = out["energy_samples"] - out["energy"]
        np.testing.assert_allclose(out["energy_std"], np.sqrt(np.mean(deviation ** 2, axis=0)), rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_cli_predict_evaluate_calibrate_work_for_every_method(trained, tmp_path, method):
    small = str(DATA / "acac_small.xyz")
    pred_file = tmp_path / "pred.xyz"
    assert main(["predict", trained[method], small, "-o", str(pred_file), "--samples", "3", "--quiet"]) == 0
    frames = ase.io.read(pred_file, ":")
    assert len(frames) == 5 and "blip_energy_std" in frames[0].info
    assert frames[0].arrays["blip_forces_std"].shape == (len(frames[0]), 3)

    metrics_file = tmp_path / "m.json"
    assert main(["evaluate", trained[method], small, "--samples", "3", "--json", str(metrics_file),
                 "--quiet"]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) == {"energy", "energy_per_atom", "forces"}
    assert set(metrics["forces"]) >= {"rmse", "nll", "miscalibration_area", "ence", "spearman", "coverage_95"}
    if method == "deterministic":
        assert metrics["forces"]["nll"] is None
    else:
        assert np.isfinite(metrics["forces"]["nll"])

    calibrated = tmp_path / "cal.pt"
    assert main(["calibrate", trained[method], small, "-o", str(calibrated), "--samples", "3", "--quiet"]) == 0
    model = blip.load(calibrated)
    if method == "deterministic":
        assert model.calibration == {"energy": 1.0, "forces": 1.0}  # nothing to scale
    else:
        assert all(model.calibration[q] > 0 and model.calibration[q] != 1.0 for q in ("energy", "forces"))
        # BLIP with feature-based rates also widens the force and energy spreads with the feature distance,
        # faster beyond the validation split's largest, and floors each structure's force spreads by its atoms' mean
        widening = ({"forces_novelty", "novelty_centre", "energy_novelty", "energy_novelty_centre",
                     "forces_novelty_beyond", "novelty_limit", "energy_novelty_beyond", "energy_novelty_limit",
                     "forces_structure_floor", "structure_floor_novelty", "structure_floor_centre",
                     "structure_floor_limit"} if method == "blip" else set())
        assert set(model.calibration) == {"energy", "forces", "forces_floor"} | widening
        assert model.calibration.get("forces_novelty", 0.0) >= 0.0


def test_deterministic_ignores_samples_and_matches_map_of_itself(trained, atoms):
    model = blip.load(trained["deterministic"])
    a = model.predict(atoms, samples=0)
    b = model.predict(atoms, samples=8, seed=3)
    np.testing.assert_array_equal(a["energy"], b["energy"])
    assert np.all(b["energy_std"] == 0)


def test_mc_dropout_is_reproducible_with_a_seed_and_differs_between_seeds(trained, atoms):
    model = blip.load(trained["mc_dropout"])
    a = model.predict(atoms, samples=4, seed=1)
    b = model.predict(atoms, samples=4, seed=1)
    c = model.predict(atoms, samples=4, seed=2)
    np.testing.assert_array_equal(a["energy_samples"], b["energy_samples"])
    np.testing.assert_array_equal(a["forces_samples"][0], b["forces_samples"][0])
    assert not np.allclose(a["energy_samples"], c["energy_samples"])
    # the 4 samples of one seed differ from each other: dropout is on at prediction
    assert np.all(np.ptp(a["energy_samples"], axis=0) > 0)
    # samples=0 is the dropout-free pass: zero std, and not one of the dropout samples
    m = model.predict(atoms, samples=0)
    assert np.all(m["energy_std"] == 0)
    assert not np.any(np.isclose(a["energy_samples"], m["energy"][None], rtol=0, atol=1e-9))


@pytest.mark.parametrize("method", ["blip", "mc_dropout"])
def test_noise_free_pass_as_one_more_replica_gives_the_same_prediction(trained, atoms, method, monkeypatch):
    """On a GPU ``predict`` runs the noise-free pass as a noise-free replica of the sampled pass
    (``batch["noise_free"]``): the same prediction, spreads and samples as with a pass of its own,
    also when the replicas are split over several passes."""
    import blip.predictor
    from blip.data import build_graph, collate

    model = blip.load(trained[method])
    for m in model.members:
        m.double()
    structures = atoms[:2]
    own_pass = model.predict(structures, samples=5, seed=4)
    monkeypatch.setattr(blip.predictor.BlipModel, "folds_map_pass", property(lambda self: True))
    graphs = [build_graph(a, model.cutoff, index=i) for i, a in enumerate(structures)]
    batch = collate(graphs, dtype=torch.float64)
    for max_edges in (blip.predictor.MAX_EDGES_PER_PASS, 1):  # 1: each replica a pass of its own
        monkeypatch.setattr(blip.predictor, "MAX_EDGES_PER_PASS", max_edges)
        folded = model.predict(structures, samples=5, seed=4)
        for key in ("energy", "energy_std", "energy_samples"):
            np.testing.assert_allclose(folded[key], own_pass[key], rtol=0, atol=1e-10)
        for key in ("forces", "forces_std", "forces_samples"):
            for a, b in zip(folded[key], own_pass[key]):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
        out = model.sample_batch(batch, 5, 4, noise_free_copy=True)
        assert out["energy"].shape == (6, 2)
        map_pass = model.sample_batch(batch, 0, 4)
        torch.testing.assert_close(out["energy"][5:], map_pass["energy"], rtol=0, atol=1e-10)
        torch.testing.assert_close(out["forces"][5:], map_pass["forces"], rtol=0, atol=1e-10)
        assert not torch.allclose(out["energy"][:5], map_pass["energy"].expand(5, 2), rtol=0, atol=1e-6)


def test_mc_dropout_rate_is_the_configured_bernoulli_rate(trained):
    model = blip.load(trained["mc_dropout"])
    member = model.members[0]
    assert member.dropout_p == model.config["uq"]["dropout_p"] == 0.1
    assert member.inference is None and member.layers  # same noisy layers as BLIP, no inference net
    assert member.layers == blip.load(trained["blip"]).members[0].layers


def test_ensemble_is_mean_and_population_std_of_its_members(trained, atoms):
    model = blip.load(trained["ensemble"])
    out = model.predict(atoms, seed=0)
    per_member = []
    for member in model.members:
        single = copy.copy(model)
        single.members = [member]
        per_member.append(single.predict(atoms)["energy"])
    per_member = np.array(per_member)
    np.testing.assert_allclose(out["energy"], per_member.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["energy_std"], per_member.std(0), rtol=1e-6, atol=1e-12)
    assert np.all(out["energy_std"] > 0)  # members were seeded differently


def test_ensemble_of_identical_members_has_zero_spread(trained, atoms, tmp_path):
    model = blip.load(trained["ensemble"])
    state = model.members[0].state_dict()
    for member in model.members[1:]:
        member.load_state_dict(state)
    save_model(model, tmp_path / "same.pt")
    out = blip.load(tmp_path / "same.pt").predict(atoms, seed=0)
    assert np.all(out["energy_std"] == 0)
    assert all(np.all(s == 0) for s in out["forces_std"])
    single = copy.copy(model)
    single.members = model.members[:1]
    np.testing.assert_allclose(out["energy"], single.predict(atoms)["energy"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("factor", [0.25, 3.0])
def test_fit_scale_recovers_a_known_factor(factor):
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.01, 0.5, 20_000)
    err = factor * sigma * rng.standard_normal(sigma.size)
    assert fit_scale(err, sigma) == pytest.approx(factor, rel=0.02)
    assert fit_scale(err, np.zeros_like(sigma)) == 1.0  # no uncertainty: nothing to fit


def test_a_floor_keeps_rounding_noise_out_of_the_fitted_factor():
    """Components zero by symmetry carry rounding noise in both the residual and the spread (ratios
    far from the true factor); with the floor (eV/A, far above that noise, far below the real
    spreads) the factor and the widening's b are those of the other components, without it not."""
    from blip.uq.recalibration import fit_novelty_widening

    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.01, 0.5, 20_000)
    err = 2.0 * sigma * rng.standard_normal(sigma.size)
    noise_sigma = rng.uniform(1e-9, 1e-8, 5_000)
    noise_err = 1e-6 * rng.standard_normal(noise_sigma.size)  # |err| / sigma ~ 100-1000
    all_err, all_sigma = np.concatenate([err, noise_err]), np.concatenate([sigma, noise_sigma])
    assert fit_scale(all_err, all_sigma) > 10.0  # the plain fit follows the rounding noise
    assert fit_scale(all_err, all_sigma, floor=1e-3) == pytest.approx(2.0, rel=0.03)
    assert fit_scale(err, sigma, floor=1e-3) == pytest.approx(fit_scale(err, sigma), rel=0.01)
    nu = np.concatenate([rng.standard_normal(sigma.size), np.zeros(noise_sigma.size)])
    widened_err = all_err * np.exp(0.5 * nu)
    s, b = fit_novelty_widening(widened_err, all_sigma, nu, floor=1e-3)
    assert s == pytest.approx(2.0, rel=0.05) and b == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("method", ["blip", "ensemble"])
def test_calibrate_recovers_a_known_factor_through_the_cli(trained, atoms, tmp_path, method):
    """Reference labels = mean + c * sigma * z: `blip calibrate` must return c * rms(z) exactly
    (the plain factors: the per-atom widening and the fit's force floor, on by default, have their own tests)."""
    model = blip.load(trained[method])
    model.config["uq"].update(novelty_widening=False, energy_novelty_widening=False, force_std_floor=0.0)
    plain = tmp_path / "plain.pt"
    save_model(model, plain)
    pred = model.predict(atoms, samples=3, seed=0)
    rng = np.random.default_rng(1)
    c_e, c_f = 2.0, 0.5
    z_e = rng.standard_normal(len(atoms))
    z_f = [rng.standard_normal(f.shape) for f in pred["forces"]]
    labelled = []
    for i, a in enumerate(atoms):
        a = a.copy()
        a.calc = SinglePointCalculator(a, energy=pred["energy"][i] + c_e * pred["energy_std"][i] * z_e[i],
                                       forces=pred["forces"][i] + c_f * pred["forces_std"][i] * z_f[i])
        labelled.append(a)
    valid = tmp_path / "valid.xyz"
    ase.io.write(valid, labelled, format="extxyz")
    out = tmp_path / "cal.pt"
    assert main(["calibrate", str(plain), str(valid), "-o", str(out), "--samples", "3", "--quiet"]) == 0
    cal = blip.load(out)
    expect_e = c_e * np.sqrt(np.mean(z_e ** 2))
    expect_f = c_f * np.sqrt(np.mean(np.concatenate([z.ravel() for z in z_f]) ** 2))
    assert cal.calibration["energy"] == pytest.approx(expect_e, rel=1e-4)
    assert cal.calibration["forces"] == pytest.approx(expect_f, rel=1e-4)
    # every prediction path applies the factor to the spread and leaves the mean alone
    after = cal.predict(atoms, samples=3, seed=0)
    np.testing.assert_allclose(after["energy"], pred["energy"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(after["energy_std"], expect_e * pred["energy_std"], rtol=1e-4)
    np.testing.assert_allclose(after["forces_std"][0], expect_f * pred["forces_std"][0], rtol=1e-4)
    pred_file = tmp_path / "p.xyz"
    assert main(["predict", str(out), str(DATA / "acac_small.xyz"), "-o", str(pred_file), "--samples", "3",
                 "--quiet"]) == 0
    frames = ase.io.read(pred_file, ":")
    np.testing.assert_allclose([f.info["blip_energy_std"] for f in frames], after["energy_std"], rtol=1e-6)
    calc = blip.Calculator(cal, samples=3, seed=0)
    a0 = atoms[0].copy()
    a0.calc = calc
    a0.get_potential_energy()
    assert calc.results["energy_std"] == pytest.approx(after["energy_std"][0], rel=1e-5)


def test_evaluate_report_of_a_calibrated_model_shows_before_and_after(trained, tmp_path):
    from blip.data import read_labelled
    from blip.evaluate import evaluate_structures
    from blip.report import recalibration_markdown

    model = blip.load(trained["mc_dropout"])
    structures = read_labelled(DATA / "acac_small.xyz")
    raw_metrics, _ = evaluate_structures(model, structures, samples=3, seed=0)
    model.calibration = {"energy": 2.0, "forces": 0.5}
    save_model(model, tmp_path / "cal.pt")
    cal_metrics, arrays = evaluate_structures(model, structures, samples=3, seed=0)
    text, pairs = recalibration_markdown(arrays, model.calibration)
    np.testing.assert_allclose(pairs["forces"]["before"][1], arrays["forces"]["std"] / 0.5)
    nll_before = float(text.split("| forces | 0.5 | ")[1].split(" → ")[0])
    assert nll_before == pytest.approx(raw_metrics["forces"]["nll"], rel=1e-3)
    assert cal_metrics["forces"]["nll"] != pytest.approx(raw_metrics["forces"]["nll"], rel=1e-3)

    out = tmp_path / "report"
    assert main(["evaluate", str(tmp_path / "cal.pt"), str(DATA / "acac_small.xyz"), "--samples", "3",
                 "--report", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert "## Recalibration (before → after)" in md and "| forces | 0.5 |" in md
    assert (out / "forces_recalibration.png").is_file() and (out / "energy_recalibration.png").is_file()
    # an uncalibrated model's report has no such section
    assert main(["evaluate", trained["mc_dropout"], str(DATA / "acac_small.xyz"), "--samples", "3",
                 "--report", str(tmp_path / "plain"), "--quiet"]) == 0
    assert "Recalibration" not in (tmp_path / "plain" / "report.md").read_text()


def _older_and_current(path, tmp_path, key: str, written=None):
    """(the BLIP model file at ``path`` loaded as if written before ``uq.key`` existed, the file as it
    is); ``written``: the value the file holds, checked first when given."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if written is not None:
        assert payload["config"]["uq"][key] == written
    del payload["config"]["uq"][key]
    torch.save(payload, tmp_path / "older.pt")
    return blip.load(tmp_path / "older.pt"), blip.load(path)


def test_a_model_file_without_a_newer_uq_key_loads_with_its_default(trained, atoms, tmp_path):
    """Files written before a uq key existed (here ``distance_mean_one``) load with its default."""
    older, current = _older_and_current(trained["blip"], tmp_path, "distance_mean_one")
    assert older.config["uq"]["distance_mean_one"] is False
    np.testing.assert_array_equal(older.predict(atoms[:2], samples=2, seed=0)["forces_std"][0],
                                  current.predict(atoms[:2], samples=2, seed=0)["forces_std"][0])


def test_a_model_file_from_before_distance_metric_keeps_its_mahalanobis_distance(trained, tmp_path):
    """The distance changed when the key came: older files keep the one they were trained with."""
    older, current = _older_and_current(trained["blip"], tmp_path, "distance_metric", "auto")  # molecules: euclidean
    assert older.config["uq"]["distance_metric"] == "mahalanobis"
    assert older.members[0].inference.metric != "euclidean" and current.members[0].inference.metric == "euclidean"


def test_a_model_file_from_before_distance_offset_keeps_offset_one(trained, tmp_path):
    """The rates' distance term changed with the key (log(1 + m) before): older files keep it."""
    older, current = _older_and_current(trained["blip"], tmp_path, "distance_offset", 0.05)
    assert older.config["uq"]["distance_offset"] == 1.0 and older.members[0].inference.offset == 1.0
    assert current.members[0].inference.offset == 0.05
    head = older.members[0].inference.heads_list()[0]
    assert head.u0 == pytest.approx(math.log(2.0))


def test_a_model_file_from_before_distance_slope_says_it_started_at_one_and_predicts_the_same(trained, atoms, tmp_path):
    """The slope is learned and stored with the weights, so an older file predicts exactly as before;
    its config names the start it was trained from (1), which a retraining from it would reuse."""
    older, current = _older_and_current(trained["blip"], tmp_path, "distance_slope", "auto")  # PaiNN: 2
    assert older.config["uq"]["distance_slope"] == 1.0
    heads = zip(older.members[0].inference.heads_list(), current.members[0].inference.heads_list())
    assert all(torch.equal(a.slope, b.slope) for a, b in heads)  # the trained slopes, not the start
    old_pred, new_pred = (m.predict(atoms[:2], samples=2, seed=0) for m in (older, current))
    np.testing.assert_array_equal(old_pred["forces_std"][0], new_pred["forces_std"][0])


def test_a_model_file_from_before_noise_draws_keeps_draws_per_row(trained, atoms, tmp_path):
    """Its calibration was fitted on samples with independent draws per row: it keeps them."""
    older, current = _older_and_current(trained["blip"], tmp_path, "noise_draws", "structure")
    assert older.config["uq"]["noise_draws"] == "row"
    assert not older.members[0].shared_draws and current.members[0].shared_draws
    old_pred, new_pred = (m.predict(atoms[:2], samples=4, seed=3) for m in (older, current))
    np.testing.assert_allclose(old_pred["energy"], new_pred["energy"], rtol=0, atol=1e-9)  # the same MAP pass
    assert not np.allclose(old_pred["energy_std"], new_pred["energy_std"], rtol=1e-3)  # other samples


def test_a_model_file_from_before_the_force_floor_recalibrates_without_it(trained, tmp_path):
    """Older files were recalibrated without the floor: recalibrating one again gives the plain factor.
    With a floor the factor is fitted with it, and ``forces_std`` carries it in quadrature while the
    samples do not."""
    from blip.data import read_labelled
    from blip.uq.recalibration import recalibrate

    older, current = _older_and_current(trained["blip"], tmp_path, "force_std_floor", 0.01)
    assert older.config["uq"]["force_std_floor"] == 0.0
    structures = read_labelled(DATA / "acac_small.xyz")[:3]
    atoms = [s.atoms for s in structures]
    for model in (older, current):
        model.config["uq"].update(novelty_widening=False, energy_novelty_widening=False, force_std="component",
                                  structure_floor=False)  # the constant floor alone (the structure floor: test_novelty)
    current.config["uq"]["force_std_floor"] = 0.1  # of the force RMSE: large for this tiny model, so it shows
    plain, with_floor = (recalibrate(m, structures, samples=3, seed=0)["forces"] for m in (older, current))
    old_pred, new_pred = (m.predict(atoms, samples=3, seed=0) for m in (older, current))
    raw = [x / plain for x in old_pred["forces_std"]]
    err = np.concatenate([(s.forces - f).ravel() for s, f in zip(structures, old_pred["forces"])])
    std = np.concatenate([x.ravel() for x in raw])
    floor = 0.1 * np.sqrt(np.mean(err ** 2))
    assert "forces_floor" not in older.calibration
    assert current.calibration["forces_floor"] == pytest.approx(floor, rel=1e-9)
    assert plain == pytest.approx(fit_scale(err, std), rel=1e-6)
    assert with_floor == pytest.approx(fit_scale(err, std, floor), rel=1e-6)
    assert with_floor != pytest.approx(plain, rel=1e-2)
    for i in range(len(atoms)):
        np.testing.assert_allclose(new_pred["forces_std"][i], np.sqrt((with_floor * raw[i]) ** 2 + floor ** 2), rtol=1e-9)
        np.testing.assert_allclose(new_pred["forces_samples"][i] - new_pred["forces"][i],
                                   (old_pred["forces_samples"][i] - old_pred["forces"][i]) * with_floor / plain,
                                   rtol=1e-9, atol=1e-12)


def test_the_bench_and_the_report_apply_and_remove_the_force_floor():
    """The bench's recalibrated force spread carries the floor in quadrature (energies none); the
    report's "before recalibration" spread takes it off again."""
    from blip.bench.runner import recalibrated_std
    from blip.report import recalibration_markdown

    rng = np.random.default_rng(0)
    raw = rng.uniform(1e-4, 1e-2, 60)
    a = {"ref": rng.standard_normal(60) * 0.1, "pred": np.zeros(60), "std": raw}
    scales = {"energy": 3.0, "forces": 2.0, "forces_floor": 0.01}
    np.testing.assert_allclose(recalibrated_std(a, "forces", scales), np.sqrt((2.0 * raw) ** 2 + 1e-4), rtol=1e-12)
    np.testing.assert_allclose(recalibrated_std(a, "energy", scales), 3.0 * raw, rtol=1e-12)
    calibrated = {**a, "std": recalibrated_std(a, "forces", scales)}
    _, pairs = recalibration_markdown({"forces": calibrated}, scales)
    np.testing.assert_allclose(pairs["forces"]["before"][1], raw, rtol=1e-9)


def test_bench_cost_unit_is_one_network_even_for_an_ensemble(trained, atoms):
    """``blip bench`` divides predict times by one network's MAP pass: for a run without a
    deterministic model whose first method is the ensemble, that is its first member alone (the
    ensemble's own MAP pass runs every member, which made its predict cost read ~1x)."""
    from blip.bench.runner import one_network

    model = blip.load(trained["ensemble"])
    single = one_network(model)
    assert len(single.members) == 1 and single.members[0] is model.members[0] and len(model.members) == 2
    first = copy.copy(model)
    first.members = model.members[:1]
    np.testing.assert_array_equal(single.predict(atoms, samples=0)["energy"], first.predict(atoms, samples=0)["energy"])
    blip_model = blip.load(trained["blip"])
    assert one_network(blip_model) is blip_model


def test_a_model_file_from_before_the_structure_floor_recalibrates_without_it(trained, tmp_path):
    """Files written before ``uq.structure_floor`` recalibrate as they were (no floor per structure);
    today's files fit one (its four calibration keys) and predict with it."""
    from blip.data import read_labelled
    from blip.uq.recalibration import STRUCTURE_FLOOR_KEYS, recalibrate

    older, current = _older_and_current(trained["blip"], tmp_path, "structure_floor", "auto")
    assert older.config["uq"]["structure_floor"] is False
    structures = read_labelled(DATA / "acac_small.xyz")[:4]
    assert not set(STRUCTURE_FLOOR_KEYS) & set(recalibrate(older, structures, samples=3, seed=0))
    assert set(STRUCTURE_FLOOR_KEYS) <= set(recalibrate(current, structures, samples=3, seed=0))
    assert current.calibration["forces_structure_floor"] >= 0.0 and current.calibration["structure_floor_novelty"] >= 0.0
