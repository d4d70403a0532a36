"""`blip bench`: every method and every column in results.md / results.json (tiny quick runs)."""

from __future__ import annotations

import json
import shutil

import ase.io
import numpy as np
import pytest

from blip.bench.protocols import Budget, parse_budget_scale
from blip.cli import main
from blip.errors import ConfigError
from conftest import EXAMPLES

METHODS = ("deterministic", "blip", "mc_dropout", "ensemble")
COLUMNS = ("method", "test_set", "energy_rmse", "forces_rmse", "forces_nll", "miscalibration_area", "ence",
           "spearman", "coverage_95", "forces_nll_recal", "miscalibration_area_recal", "ence_recal",
           "coverage_95_recal", "train_seconds", "predict_cost_ratio", "scale_energy", "scale_forces")
PROBABILISTIC = ("forces_nll", "miscalibration_area", "ence", "spearman", "coverage_95", "forces_nll_recal",
                 "miscalibration_area_recal", "ence_recal", "coverage_95_recal")


@pytest.fixture(scope="module")
def data_scarce(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ds"
    code = main(["bench", "data-scarce", "--quick", "--data", str(EXAMPLES), "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_data_scarce_quick_writes_every_method_and_column(data_scarce):
    results = json.loads((data_scarce / "results.json").read_text())
    rows = results["rows"]
    assert {(r["method"], r["n_train"]) for r in rows} == {(m, n) for m in METHODS for n in (5, 10)}
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        assert not missing, missing
        assert r["test_set"] == "test_MD_300K" and r["uq_target"] == "forces"
        assert r["energy_rmse"] > 0 and r["forces_rmse"] > 0 and r["train_seconds"] > 0
        assert r["predict_cost_ratio"] > 0
        if r["method"] == "deterministic":
            assert all(r[c] is None for c in PROBABILISTIC)
            assert r["scale_forces"] == 1.0
        else:
            assert all(isinstance(r[c], float) and np.isfinite(r[c]) for c in PROBABILISTIC), r["method"]
            assert 0 <= r["coverage_95_recal"] <= 1 and r["scale_forces"] > 0
    s = results["settings"]
    assert s["complete"] and s["quick"] and s["methods"] == list(METHODS)
    assert "each of the 2 ensemble members gets this budget" in s["budget"]["statement"]
    assert s["versions"]["torch"] and s["machine"]["cpu_count"]
    assert s["protocol_settings"]["sizes"] == [5, 10]


def test_data_scarce_results_md_and_plots(data_scarce):
    md = (data_scarce / "results.md").read_text()
    for header in ("E RMSE [meV]", "F RMSE [meV/Å]", "NLL", "miscal. area", "ENCE", "Spearman", "cov. 95%",
                   "train [s]", "predict cost [×MAP]", "## N=5", "## N=10", "## Learning curves"):
        assert header in md, header
    for m in METHODS:
        assert f"| {m} |" in md
    assert "same budget for every method" in md and " → " in md
    plots = data_scarce / "plots"
    assert (plots / "test_MD_300K_forces_rmse_vs_N.png").is_file()
    assert (plots / "N10_test_MD_300K_calibration_recal.png").is_file()
    for link in [line for line in md.splitlines() if line.startswith("![")]:
        assert (data_scarce / link.split("(")[1].rstrip(")")).is_file()


def test_calibrated_models_are_written_and_loadable(data_scarce):
    import blip

    rows = json.loads((data_scarce / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "blip" and r["n_train"] == 10)
    model = blip.load(data_scarce / "runs" / "N10" / "blip" / "model_calibrated.pt")
    assert model.calibration["forces"] == pytest.approx(row["scale_forces"])
    # the row's recalibrated scores are those of the calibrated model on the same test structures
    from blip.bench.protocols import Options, build_plan
    from blip.evaluate import evaluate_structures

    plan = build_plan("data-scarce", EXAMPLES, Options(quick=True, seed=0))
    test = next(e for e in plan.experiments if len(e.train) == 10).tests[0]
    metrics, _ = evaluate_structures(model, test.structures, seed=0)
    assert row["forces_nll_recal"] == pytest.approx(metrics["forces"]["nll"], rel=1e-4)
    assert row["coverage_95_recal"] == pytest.approx(metrics["forces"]["coverage_95"], abs=1e-9)
    assert row["spearman_recal"] == pytest.approx(metrics["forces"]["spearman"], abs=1e-9)


def test_resume_reuses_finished_runs_and_reports_their_epoch_times(data_scarce, tmp_path):
    """--resume on a finished bench trains nothing more: same models, same scores."""
    out = tmp_path / "again"
    before = {(r["method"], r["n_train"]): r for r in json.loads((data_scarce / "results.json").read_text())["rows"]}
    assert main(["bench", "data-scarce", "--quick", "--data", str(EXAMPLES), "--out", str(out), "--quiet",
                 "--runs-dir", str(data_scarce / "runs"), "--resume"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        b = before[(r["method"], r["n_train"])]
        assert r["forces_rmse"] == pytest.approx(b["forces_rmse"], rel=1e-6)
        assert r["epochs_run"] == b["epochs_run"]
        assert 0 < r["train_seconds"] <= b["train_seconds"]  # epoch times only, no set-up


def _fake_ethanol(root):
    """An ethanol/ folder made of acetylacetone files: the protocol's layout, not its chemistry."""
    folder = root / "ethanol"
    folder.mkdir(parents=True)
    frames = ase.io.read(EXAMPLES / "acac" / "train_300K.xyz", ":40")
    ase.io.write(folder / "train.xyz", frames[:30])
    ase.io.write(folder / "test_MD.xyz", frames[30:36])
    mixed = frames[36:40]
    for i, a in enumerate(mixed):
        a.info["config_type"] = "methanol" if i % 2 else "ethanol"
    ase.io.write(folder / "test_eth_meth.xyz", mixed)
    for name, key in (("test_H_removal.xyz", "OH_dist"), ("test_norm_mode_874.xyz", "displacement")):
        path_frames = []
        for j, a in enumerate(frames[:5]):
            b = a.copy()
            b.info = {key: 0.5 + 0.25 * j}
            b.info["energy"] = a.get_potential_energy()  # energy only, no forces
            path_frames.append(b)
        ase.io.write(folder / name, path_frames)
    shutil.copy(EXAMPLES / "acac" / "isolated_atoms.xyz", folder / "isolated_atoms.xyz")
    return root


def test_ood_ethanol_quick_scores_paths_energy_only_and_plots_sigma(tmp_path):
    data = _fake_ethanol(tmp_path / "data")
    out = tmp_path / "ood"
    assert main(["bench", "ood-ethanol", "--quick", "--data", str(data), "--out", str(out), "--quiet",
                 "--methods", "deterministic,blip"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["test_set"] for r in rows} == {"test_MD", "test_eth_meth", "test_H_removal", "test_norm_mode_874"}
    meth = [r for r in rows if r["test_set"] == "test_eth_meth"]
    assert all(r["n_structures"] == 2 for r in meth)  # only config_type=methanol is scored
    path_row = next(r for r in rows if r["test_set"] == "test_H_removal" and r["method"] == "blip")
    assert path_row["uq_target"] == "energy" and path_row["forces_rmse"] is None
    assert path_row["nll"] == path_row["energy_nll"] is not None
    assert (out / "plots" / "test_H_removal_path.png").is_file()
    assert (out / "plots" / "test_norm_mode_874_path.png").is_file()


def test_missing_data_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BLIP_DATA", raising=False)
    assert main(["bench", "ood-ethanol", "--quick", "--data", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    monkeypatch.setenv("BLIP_DATA", str(tmp_path))
    assert main(["bench", "data-scarce", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip: error:") and "acac/train_300K.xyz" in err and len(err.splitlines()) == 1


def test_unknown_method_is_a_config_error(capsys):
    assert main(["bench", "data-scarce", "--quick", "--data", str(EXAMPLES), "--methods", "blip,gp"]) == 2
    assert "unknown method(s) gp" in capsys.readouterr().err


def test_budget_epochs_from_steps():
    assert Budget(steps=400).epochs_for(25, 8) == 100  # 4 batches per epoch
    assert Budget(steps=400).epochs_for(450, 8) == 8  # 57 batches per epoch
    assert Budget(epochs=3).epochs_for(450, 8) == 3
    assert "5 ensemble members" in Budget(epochs=3, minutes=2).statement(5)


def test_budget_scale_multiplies_one_methods_budget_only():
    scaled = Budget(steps=1500, minutes=2.0, scale={"blip": 3.0})
    assert scaled.epochs_for(250, 8, "blip") == 141  # ceil(4500 / 32)
    assert scaled.epochs_for(250, 8, "ensemble") == Budget(steps=1500).epochs_for(250, 8) == 47
    assert Budget(epochs=10, scale={"blip": 2.5}).epochs_for(450, 8, "blip") == 25
    assert scaled.minutes_for("blip") == 6.0 and scaled.minutes_for("deterministic") == 2.0
    assert "blip 3x" in scaled.statement(5)
    assert parse_budget_scale("blip=3, mc_dropout=1.5") == {"blip": 3.0, "mc_dropout": 1.5}
    for bad in ("blip", "blip=0", "blip=x", "=2", "blip=-1"):
        with pytest.raises(ConfigError, match="budget-scale"):
            parse_budget_scale(bad)


def test_budget_scale_below_one_keeps_at_least_one_epoch():
    assert Budget(epochs=3, scale={"blip": 0.1}).epochs_for(450, 8, "blip") == 1
    assert Budget(epochs=0, scale={"blip": 3.0}).epochs_for(450, 8, "blip") == 0


def test_budget_scale_of_an_unknown_method_is_a_config_error(capsys):
    args = ["bench", "data-scarce", "--quick", "--data", str(EXAMPLES), "--methods", "blip"]
    assert main(args + ["--budget-scale", "gp=2"]) == 2
    assert "unknown method(s) gp" in capsys.readouterr().err
    assert main(["bench", "cost", "--quick", "--budget-scale", "blip=2"]) == 2
    assert "training protocols" in capsys.readouterr().err


def test_energy_split_trains_low_and_tests_high_with_mean_and_std_over_seeds(tmp_path):
    from blip.bench.protocols import Options, build_plan, energy_ranked
    from blip.data import resolve_e0s

    plan = build_plan("energy-split", EXAMPLES, Options(quick=True, experiments=["acac"]))
    exp = plan.experiments[0]
    e0s = resolve_e0s(exp.e0s, exp.train)
    highest_train = energy_ranked(exp.train + exp.valid + exp.tests[0].structures, e0s)[-1]
    lowest_test = energy_ranked(exp.tests[1].structures, e0s)[0]
    per_atom = {id(s): (s.energy - sum(e0s[int(z)] for z in s.atoms.numbers)) / len(s.atoms)
                for s in (highest_train, lowest_test)}
    assert per_atom[id(highest_train)] <= per_atom[id(lowest_test)]
    assert exp.reference_test == "low_energy"

    out = tmp_path / "es"
    assert main(["bench", "energy-split", "--quick", "--data", str(EXAMPLES), "--sets", "acac", "--seeds", "2",
                 "--methods", "deterministic,blip", "--out", str(out), "--quiet", "--budget-scale", "blip=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["seed"], r["method"], r["test_set"]) for r in results["rows"]} == {
        (s, m, t) for s in (0, 1) for m in ("deterministic", "blip") for t in ("low_energy", "high_energy")}
    epochs = {r["method"]: r["epochs"] for r in results["rows"]}
    assert epochs["blip"] == 2 * epochs["deterministic"]  # --budget-scale: BLIP's networks train twice as long
    summary = {(r["method"], r["test_set"]): r for r in results["summary"]}
    blip_high = summary[("blip", "high_energy")]
    per_seed = [r["forces_rmse"] for r in results["rows"] if (r["method"], r["test_set"]) == ("blip", "high_energy")]
    assert blip_high["n_seeds"] == 2 and blip_high["forces_rmse"] == pytest.approx(np.mean(per_seed))
    assert blip_high["forces_rmse_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert summary[("blip", "low_energy")]["sigma_ratio"] == pytest.approx(1.0)
    assert blip_high["forces_sigma_ratio"] > 0 and summary[("deterministic", "high_energy")]["sigma_ratio"] is None
    md = (out / "results.md").read_text()
    assert "σ ratio" in md and " ± " in md and "seeds 0, 1" in md


def test_energy_split_takes_a_labelled_file_of_ones_own(tmp_path):
    """--sets also takes the path of an extxyz file: the experiment is named after it, E0s by least squares."""
    from blip.bench.protocols import PACKAGED_DATA, Options, build_plan

    own = tmp_path / "my_molecule.xyz"
    own.write_bytes((PACKAGED_DATA / "ammonia_gfn2.xyz").read_bytes())
    plan = build_plan("energy-split", EXAMPLES, Options(quick=True, experiments=[str(own)]))
    (exp,) = plan.experiments
    assert exp.name == "my_molecule" and exp.e0s == "average"
    assert plan.settings["data_sets"]["my_molecule"]["files"] == [str(own.resolve())]
    assert {len(s.atoms) for s in exp.train} == {4}
    with pytest.raises(ConfigError, match="neither"):
        build_plan("energy-split", EXAMPLES, Options(quick=True, experiments=[str(tmp_path / "missing.xyz")]))


def test_si_defects_trains_from_scratch_on_bulk_and_tests_held_out_groups():
    from blip.bench.protocols import SI_TEST_GROUPS, SI_TRAIN_GROUPS, Options, build_plan

    plan = build_plan("si-defects", EXAMPLES, Options(quick=True))
    (exp,) = plan.experiments
    assert exp.config["model"]["backbone"] == "painn" and "pretrained" not in exp.config["model"]
    assert [m.name for m in exp.methods] == ["deterministic", "blip", "mc_dropout", "ensemble"]
    groups = {s.atoms.info["config_type"] for s in exp.train + exp.valid}
    assert groups and groups <= set(SI_TRAIN_GROUPS)
    held_out = {t.name: t.structures for t in exp.tests if t.name in SI_TEST_GROUPS}
    assert set(held_out) == set(SI_TEST_GROUPS) and all(held_out.values())
    for name, structures in held_out.items():
        assert {s.atoms.info["config_type"] for s in structures} == {name}
    assert exp.reference_test == "test_AIMD_Elastic"
    mace = build_plan("si-defects", EXAMPLES, Options(quick=True, backbone="mace"))
    assert mace.experiments[0].config["model"]["backbone"] == "mace"
    with pytest.raises(ConfigError, match="finetune-si"):
        build_plan("si-defects", EXAMPLES, Options(quick=True, backbone="chgnet"))


def test_bundled_ammonia_labels_are_gfn2_xtb():
    """The shipped xTB data set (benchmarks/make_xtb_dataset.py): labels are raw GFN2-xTB results."""
    pytest.importorskip("tblite")
    from tblite.ase import TBLite

    from blip.bench.protocols import PACKAGED_DATA

    frames = ase.io.read(PACKAGED_DATA / "ammonia_gfn2.xyz", ":")
    assert len(frames) == 800
    for i in (3, 400, 799):  # MD at 300 K and 1500 K, a distortion
        atoms = frames[i].copy()
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        assert atoms.get_potential_energy() == pytest.approx(frames[i].get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(atoms.get_forces(), frames[i].get_forces(), atol=1e-5)


def test_cost_quick_reports_every_ratio(tmp_path):
    out = tmp_path / "cost"
    assert main(["bench", "cost", "--quick", "--backbone", "painn", "--sets", "acac,Si8", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    predict = data["rows"]
    for system, n_atoms in (("acac", 30), ("Si8", 8)):
        rows = [r for r in predict if r["system"] == system]
        assert {(r["method"], r["samples"]) for r in rows} == {("blip", 1), ("blip", 2), ("mc_dropout", 1),
                                                               ("mc_dropout", 2), ("ensemble", 2)}
        assert all(r["n_atoms"] == n_atoms and r["ratio"] > 0 for r in rows)
    # each system is timed with the BLIP model its training data would give (auto: crystals -> nearest)
    assert data["settings"]["distance_metric"] == {"painn acac": "euclidean", "painn Si8": "nearest"}
    assert data["settings"]["weight_noise"] == {"painn acac": "per_input", "painn Si8": "per_input"}
    train = {r["method"]: r for r in data["settings"]["train_step"]}
    assert train["deterministic"]["ratio"] == 1.0 and train["blip"]["seconds_per_step"] > 0
    assert {r["batch_size"] for r in data["settings"]["train_step"]} == {4}
    assert data["settings"]["train_batch_sizes"] == [4]
    assert [(r["samples"], r["every"]) for r in data["settings"]["md"]] == [(2, 5)]
    md = (out / "results.md").read_text()
    assert "| blip | 2 |" in md and "| ensemble | 2 |" in md and "Training step" in md and "| blip | 4 |" in md


def test_cost_models_record_the_feature_distance_as_recalibrated_blip_models_do():
    """The cost benchmark's BLIP model carries the default widenings, so its predict records each
    atom's feature distance (what a recalibrated model pays); the baselines carry unit factors."""
    from blip.bench.cost import MODELS, build_models, systems

    models = build_models(MODELS["painn"], quick=True)
    assert models["blip"].calibration["forces_novelty"] == 0.1
    assert models["blip"].calibration["energy_novelty"] == 0.2
    assert models["mc_dropout"].calibration == {"energy": 1.0, "forces": 1.0}
    pred = models["blip"].predict(systems(True)["acac"][:1], samples=2, seed=0, novelty=True)
    assert np.all(np.isfinite(pred["atom_novelty"][0]))


def test_cost_marginal_slope_is_the_least_squares_line():
    from blip.bench.cost import marginal_cost

    rows = [{"method": "blip", "samples": k, "ratio": 1.5 + 0.9 * k} for k in (1, 4, 8, 16)]
    rows[0]["ratio"] = 100.0  # K < 4 is left out of the fit
    fit = marginal_cost(rows, "blip")
    assert fit["slope"] == pytest.approx(0.9) and fit["intercept"] == pytest.approx(1.5)
    assert marginal_cost(rows, "mc_dropout") == {"slope": None, "intercept": None}


def test_learning_curves_of_the_plain_model_only_skip_uncertainty_plots(tmp_path):
    """A run of the deterministic model alone has no σ: its accuracy curves are drawn, and no
    empty NLL / coverage plots are written."""
    from blip.bench.results import _learning_curves

    rows = [{"method": "deterministic", "test_set": "test_MD", "n_train": n, "forces_rmse": 0.1 / n,
             "energy_rmse": 0.01 / n, "forces_nll_recal": None} for n in (10, 20)]
    written = {p.name for p in _learning_curves(tmp_path, rows)}
    assert written == {"test_MD_forces_rmse_vs_N.png", "test_MD_energy_rmse_vs_N.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)


def test_table_shows_before_and_after_only_where_recalibration_changed_the_figure():
    """'a → b' where recalibration moved a metric (NLL; Spearman and σ ratio under the widening),
    one figure where it did not."""
    from blip.bench.results import table

    row = {"method": "blip", "nll": 1.0, "nll_recal": -2.0, "spearman": 0.5, "spearman_recal": 0.5,
           "sigma_ratio": 30.0, "sigma_ratio_recal": 45.0}
    cells = table([row]).splitlines()[2].split("|")[1:-1]
    heads = table([row]).splitlines()[0].split("|")[1:-1]
    by_head = {h.strip(): c.strip() for h, c in zip(heads, cells)}
    assert by_head["NLL"] == "1 → -2"
    assert by_head["Spearman"] == "0.5"
    assert by_head["σ ratio"] == "30.0 → 45.0"
