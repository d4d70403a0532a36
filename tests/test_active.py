"""``blip active-learn``: selection rules, a tblite round end to end, resume after a kill."""

from __future__ import annotations

import copy
import csv
import json

import ase.io
import numpy as np
import pytest
import yaml

from blip.active import (ActiveLearning, pair_distance_descriptor, rank_fps, rank_greedy, resolve_config,
                         uncertainty_scores)
from blip.cli import main
from blip.data import read_labelled
from blip.errors import ConfigError

from conftest import DATA


SMALL = str(DATA / "acac_small.xyz")
TINY_TRAINING = {
    "model": {"backbone": "painn", "features": 8, "interactions": 1, "radial": 6},
    "uq": {"samples": 4},
    "training": {"epochs": 2, "batch_size": 4, "seed": 0, "patience": 50},
}


def al_config(tmp_path, **al) -> dict:
    section = {"initial_file": SMALL, "initial_size": 2, "initial_pick": "first", "pool_file": SMALL,
               "oracle": "pool", "rounds": 2, "n_select": 1, "samples": 4, "diversity": "greedy"}
    section.update(al)
    user = {"active_learning": section, "data": {"valid_fraction": 0.3, "test_files": {"small": SMALL},
                                                 "e0s": "average"},
            **copy.deepcopy(TINY_TRAINING), "output_dir": str(tmp_path / "al")}
    return user


# -- selection ---------------------------------------------------------------------------
def test_scores_from_predicted_std():
    pred = {"energy_std": np.array([0.3, 0.2]),
            "forces_std": [np.array([[0.3, 0.4, 0.0], [0.1, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.2]])]}
    np.testing.assert_allclose(uncertainty_scores(pred, "max_force_std", [2, 1]), [0.5, 0.2])
    np.testing.assert_allclose(uncertainty_scores(pred, "mean_force_std", [2, 1]), [0.3, 0.2])
    np.testing.assert_allclose(uncertainty_scores(pred, "energy_std_per_atom", [2, 1]), [0.15, 0.2])


def test_greedy_diversity_defers_near_duplicates():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    desc = np.array([[0.0, 0.0], [0.0, 0.001], [1.0, 0.0], [0.0, -2.0]])  # 1 duplicates 0
    assert rank_greedy(scores, desc, n_select=2, radius=0.1) == [0, 2, 1, 3]
    assert rank_greedy(scores, desc, n_select=2, radius=0.0) == [0, 1, 2, 3]
    assert rank_fps(scores, desc) == [0, 3, 2, 1]  # farthest first, duplicate last


def test_descriptor_is_invariant_and_sees_geometry():
    a = ase.io.read(SMALL, 0)
    d = pair_distance_descriptor(a, [1, 6, 8], 5.0)
    b = a.copy()
    b.rotate(37, "z")
    b.translate([1.0, -2.0, 0.5])
    np.testing.assert_allclose(pair_distance_descriptor(b, [1, 6, 8], 5.0), d, atol=1e-10)
    c = a.copy()
    c.positions *= 0.9
    assert np.linalg.norm(pair_distance_descriptor(c, [1, 6, 8], 5.0) - d) > 0.1 * np.linalg.norm(d)


# -- configuration -----------------------------------------------------------------------
def test_config_errors(tmp_path):
    user = al_config(tmp_path, colour="blue")
    with pytest.raises(ConfigError, match="active_learning.colour"):
        resolve_config(user, tmp_path)
    user = al_config(tmp_path)
    user["data"]["train_file"] = SMALL
    with pytest.raises(ConfigError, match="train_file"):
        resolve_config(user, tmp_path)
    user = al_config(tmp_path)
    user["data"]["test_files"] = {}
    with pytest.raises(ConfigError, match="test_files"):
        resolve_config(user, tmp_path)
    with pytest.raises(ConfigError, match="score"):
        resolve_config(al_config(tmp_path, score="largest"), tmp_path)
    with pytest.raises(ConfigError, match="pool_md"):
        resolve_config(al_config(tmp_path, pool_md={"temperature": 600}), tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_config(al_config(tmp_path, oracle="tblite", tblite={"basis": "x"}), tmp_path)
    user = al_config(tmp_path)
    user["training"]["epochs_typo"] = 3
    with pytest.raises(ConfigError, match="training.epochs_typo"):
        resolve_config(user, tmp_path)


# -- end to end --------------------------------------------------------------------------
def test_one_round_with_the_tblite_oracle(tmp_path, capsys):
    from tblite.ase import TBLite

    # pool: the 2 structures of the file not in the initial set + 2 frames of 600 K MD
    md = {"temperature": 600, "steps": 4, "every": 2, "timestep": 0.5, "starts": 1}
    user = al_config(tmp_path, oracle="tblite", initial_size=3, rounds=1, n_select=1, pool_md=md)
    path = tmp_path / "al.yaml"
    path.write_text(yaml.safe_dump(user))
    assert main(["active-learn", str(path), "--quiet"]) == 0
    out = tmp_path / "al"
    rows = list(csv.DictReader(open(out / "learning_curve.csv")))
    assert [(r["strategy"], r["round"], r["n_labelled"]) for r in rows] == [
        ("uncertainty", "0", "3"), ("random", "0", "3"), ("uncertainty", "1", "4"), ("random", "1", "4")]
    assert all(float(r["forces_rmse_meV_A"]) > 0 for r in rows)
    # the curve's numbers are those of the round's model on the (xTB-labelled) test set
    import blip
    from blip.evaluate import evaluate_structures

    model = blip.load(out / "uncertainty" / "round_001" / "train" / "model.pt")
    metrics, _ = evaluate_structures(model, read_labelled(out / "test_small.xyz"), samples=4, seed=0)
    row = next(r for r in rows if r["strategy"] == "uncertainty" and r["round"] == "1")
    assert float(row["forces_rmse_meV_A"]) == pytest.approx(1000 * metrics["forces"]["rmse"], rel=1e-5)
    assert float(row["forces_nll"]) == pytest.approx(metrics["forces"]["nll"], rel=1e-5, abs=1e-6)
    assert (out / "learning_curve.png").stat().st_size > 1000
    # every label comes from GFN2-xTB (not the DFT labels in the file): initial, picked and test
    for labelled in (out / "round_000" / "labelled.xyz", out / "uncertainty" / "round_001" / "labelled.xyz",
                     out / "test_small.xyz"):
        s = read_labelled(labelled)[-1]
        ref = s.atoms.copy()
        ref.calc = TBLite(method="GFN2-xTB", verbosity=0)
        assert s.energy == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(s.forces, ref.get_forces(), atol=1e-6)
    pool_md = ase.io.read(out / "pool_md.xyz", ":")
    assert [f.info["al_md_step"] for f in pool_md] == [2, 4] and pool_md[0].calc is None
    for strategy in ("uncertainty", "random"):
        picked = read_labelled(out / strategy / "round_001" / "labelled.xyz")[-1].atoms.info
        assert picked["al_round"] == 1 and picked["al_pool_index"] in range(4)
        assert picked.get("al_file_index") in (3, 4) or picked["al_origin"] == "md"  # never one of the initial 3
    assert "| uncertainty | 1 | 4 |" in capsys.readouterr().out


def test_resume_after_a_kill(tmp_path, monkeypatch):
    cfg = resolve_config(al_config(tmp_path), tmp_path)
    out = cfg.output_dir

    class Killed(Exception):
        pass

    def kill_after_round_1(strategy, r, rows):
        if (strategy, r) == ("uncertainty", 1):
            raise Killed

    with pytest.raises(Killed):
        ActiveLearning(cfg, progress=False, after_round=kill_after_round_1, log=lambda m: None).run()
    round2 = out / "uncertainty" / "round_002" / "labelled.xyz"
    before = round2.read_bytes()
    kept = read_labelled(out / "uncertainty" / "round_001" / "labelled.xyz")
    assert len(read_labelled(round2)) == 4 and not (out / "random" / "round_001" / "metrics.json").exists()

    trained = []
    original = ActiveLearning._train

    def counting_train(self, here, init):
        trained.append(here.relative_to(out).as_posix())
        return original(self, here, init)

    monkeypatch.setattr(ActiveLearning, "_train", counting_train)
    rows = ActiveLearning(cfg, progress=False, log=lambda m: None).run()
    # round 0 and the uncertainty strategy's round 1 are not redone
    assert trained == ["random/round_001", "uncertainty/round_002", "random/round_002"]
    assert round2.read_bytes() == before  # the labelled set of round 2 is intact
    final = read_labelled(round2)
    assert [s.atoms.info["al_file_index"] for s in final[:3]] == [s.atoms.info["al_file_index"] for s in kept]
    assert [(r["strategy"], r["round"], r["n_labelled"]) for r in rows] == [
        ("uncertainty", 0, 2), ("random", 0, 2), ("uncertainty", 1, 3), ("random", 1, 3),
        ("uncertainty", 2, 4), ("random", 2, 4)]
    picked = [s.atoms.info["al_file_index"] for s in final]
    assert len(set(picked)) == 4  # never the same structure twice
    # a different config in the same folder is refused
    changed = resolve_config(al_config(tmp_path, n_select=2), tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        ActiveLearning(changed, progress=False, log=lambda m: None).run()
    json.loads((out / "round_000" / "metrics.json").read_text())


def test_fine_tune_starts_from_the_previous_weights(tiny_model_path, tmp_path):
    import torch

    import blip
    from blip.active import _warm_start_trainer
    from blip.train.datasets import prepare_data

    previous = blip.load(tiny_model_path)
    cfg = copy.deepcopy(previous.config)
    cfg["output_dir"] = str(tmp_path / "ft")
    cfg["training"]["epochs"] = 0  # no updates: the result must be the starting weights
    cfg["data"]["max_train"] = 4
    states = [m.state_dict() for m in previous.members]
    model = _warm_start_trainer(cfg, states, progress=False).run(prepare_data(cfg))
    # weights are the starting ones; the feature statistics of the inference net are refitted
    for key, value in model.members[0].named_parameters():
        assert torch.equal(value, states[0][key]), key


# -- batch diversity, selectors, stopping rule, warm start ----------------------------------
def test_duplicate_radius_and_greedy_batch_drop_duplicates():
    from blip.active.selection import duplicate_radius, farthest_from

    labelled = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])  # NN distances 1, 1, 1, ~6.4
    radius = duplicate_radius(labelled, 0.5)
    assert radius == pytest.approx(0.5)  # 0.5 x median nearest-neighbour distance of the labelled set
    assert duplicate_radius(labelled[:1], 0.5) == 0.0
    cands = np.array([[3.0, 3.0], [3.0, 3.0], [3.3, 3.0], [3.6, 3.0], [9.0, 9.0]])
    scores = np.array([0.9, 0.9, 0.8, 0.7, 0.1])
    # exact duplicate (1) and near-duplicate within 0.5 (2) are passed over; 3 is 0.6 away: kept
    assert rank_greedy(scores, cands, n_select=3, radius=radius) == [0, 3, 4, 1, 2]
    # radius 0 still drops the exact duplicate, not the near one
    assert rank_greedy(scores, cands, n_select=2, radius=0.0)[:2] == [0, 2]
    # farthest-point sampling away from the labelled set, then from each other
    assert farthest_from(labelled, cands, 2) == [4, 0]


def test_model_features_are_per_structure_and_see_geometry(tiny_model_path):
    import blip
    from blip.active.selection import model_features

    model = blip.load(tiny_model_path)
    a = ase.io.read(SMALL, 0)
    b = a.copy()
    b.rotate(50, "x")
    c = a.copy()
    c.positions *= 1.1
    f = model_features(model, [a, b, c])
    assert f.shape[0] == 3 and f.shape[1] == 2 * model.config["model"]["features"]
    np.testing.assert_allclose(f[1], f[0], atol=1e-5)
    assert np.linalg.norm(f[2] - f[0]) > 1e-3


@pytest.mark.parametrize("strategy", ["uncertainty", "random", "fps", "ensemble"])
def test_one_round_of_each_selector(tmp_path, strategy):
    cfg = resolve_config(al_config(tmp_path, strategies=[strategy], rounds=1, n_select=2, ensemble_size=2,
                                   diversity_threshold=0.5), tmp_path)
    rows = ActiveLearning(cfg, progress=False, log=lambda m: None).run()
    assert [(r["strategy"], r["round"], r["n_labelled"]) for r in rows] == [(strategy, 0, 2), (strategy, 1, 4)]
    out = cfg.output_dir
    picked = read_labelled(out / strategy / "round_001" / "labelled.xyz")
    assert len({s.atoms.info["al_file_index"] for s in picked}) == 4
    sel = json.loads((out / strategy / "round_001" / "selection.json").read_text())
    assert len(sel["pool_indices"]) == 2 and sel["pool_max_force_std"] > 0
    if strategy in ("uncertainty", "ensemble"):
        assert sel["diversity_radius"] > 0 and len(sel["scores"]) == 2
    if strategy == "ensemble":
        import blip

        assert blip.load(out / "round_000" / "selector" / "model.pt").method == "ensemble"
    csv_rows = list(csv.DictReader(open(out / "learning_curve.csv")))
    assert float(csv_rows[0]["pool_max_force_std"]) > 0 and csv_rows[0]["stopped"] == "False"


def test_stopping_rule_ends_the_loop(tmp_path):
    cfg = resolve_config(al_config(tmp_path, strategies=["uncertainty", "random"], rounds=3,
                                   stop_max_force_std=1e6), tmp_path)
    rows = ActiveLearning(cfg, progress=False, log=lambda m: None).run()
    assert [(r["strategy"], r["round"]) for r in rows] == [("uncertainty", 0), ("random", 0)]
    assert all(r["stopped"] for r in rows)
    out = cfg.output_dir
    assert not (out / "uncertainty" / "round_001").exists()
    csv_rows = list(csv.DictReader(open(out / "learning_curve.csv")))
    assert [r["stopped"] for r in csv_rows] == ["True", "True"]
    assert 0 < float(csv_rows[0]["pool_max_force_std"]) < 1e6
    # a rerun (resume) does not start the stopped strategies again
    again = ActiveLearning(cfg, progress=False, log=lambda m: None).run()
    assert len(again) == 2
    with pytest.raises(ConfigError, match="stop_max_force_std"):
        resolve_config(al_config(tmp_path, stop_max_force_std=-1), tmp_path)


def test_warm_start_round_loads_the_previous_weights(tmp_path):
    import torch

    import blip

    cfg = resolve_config(al_config(tmp_path, strategies=["uncertainty"], rounds=1, warm_start=True,
                                   warm_start_epochs=0), tmp_path)
    ActiveLearning(cfg, progress=False, log=lambda m: None).run()
    out = cfg.output_dir
    before = blip.load(out / "round_000" / "train" / "model.pt").members[0]
    after = blip.load(out / "uncertainty" / "round_001" / "train" / "model.pt").members[0]
    for (key, value), (_, start) in zip(after.named_parameters(), before.named_parameters()):
        assert torch.equal(value, start), key
    # from scratch, round 1 is a new network
    cold = resolve_config(al_config(tmp_path / "cold", strategies=["uncertainty"], rounds=1), tmp_path)
    ActiveLearning(cold, progress=False, log=lambda m: None).run()
    fresh = blip.load(cold.output_dir / "uncertainty" / "round_001" / "train" / "model.pt").members[0]
    assert any(not torch.equal(p, q) for p, q in zip(fresh.parameters(), before.parameters()))


def test_bench_active_label_fraction_rule():
    from blip.bench.active import labels_to_reach, overall_rmse

    n, rmse = [20, 40, 60], [300.0, 200.0, 100.0]
    assert labels_to_reach(n, rmse, 150.0, 120) == pytest.approx(50.0)  # linear between rounds
    assert labels_to_reach(n, rmse, 400.0, 120) == 20.0
    assert labels_to_reach(n, rmse, 50.0, 120) == pytest.approx(70.0)  # extrapolated last segment
    assert labels_to_reach(n, rmse, 1.0, 75) == 75.0  # capped
    assert labels_to_reach(n, [300.0, 200.0, 250.0], 150.0, 120) == 120.0  # no longer falling: the cap
    rows = [{"test": "a", "forces_rmse_meV_A": 3.0}, {"test": "b", "forces_rmse_meV_A": 1.0}]
    assert overall_rmse(rows, {"a": 1, "b": 3}) == pytest.approx(np.sqrt((9 + 3) / 4))


def test_weighted_batch_selection_trades_sigma_against_distance_to_the_known():
    from blip.active.selection import rank_weighted

    reference = np.array([[0.0, 0.0]])  # the labelled set
    cands = np.array([[1.0, 0.0], [1.0, 0.01], [3.0, 0.0], [0.1, 0.0]])
    scores = np.array([1.0, 1.0, 0.5, 1.0])
    # score x distance: 1.0, 1.00005, 1.5, 0.1 -> the far candidate first, then 1 (a hair farther
    # from the known than 0); its near-duplicate 0 then drops to 0.01, below 3 (near the known, 0.1)
    assert rank_weighted(scores, cands, reference, n_select=3) == [2, 1, 3, 0]
    # beyond n_select the rest follow in score order (stable)
    assert rank_weighted(scores, cands, reference, n_select=1) == [2, 0, 1, 3]
    # exact duplicates of a pick are never picked while anything else is left
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert rank_weighted(np.array([1.0, 1.0, 0.1]), dup, reference, n_select=2) == [0, 2, 1]
