"""End to end through the `blip` command: train, resume, predict, evaluate, calibrate, bad input."""

import csv
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml

import blip
from blip.cli import main
from blip.uq.recalibration import structure_floor
from conftest import DATA, EXAMPLES, tiny_config


def _write_config(tmp_path, cfg_overrides=None) -> Path:
    cfg = {
        "data": {"train_file": str(EXAMPLES / "acac" / "train_300K.xyz"), "max_train": 40,
                 "e0s": str(EXAMPLES / "acac" / "isolated_atoms.xyz"),
                 "test_files": {"small": str(DATA / "acac_small.xyz")}},
        "model": {"backbone": "painn", "features": 16, "interactions": 2, "radial": 8},
        "uq": {"samples": 4},
        "training": {"epochs": 2, "batch_size": 8, "seed": 0},
        "output_dir": str(tmp_path / "out"),
    }
    for section, values in (cfg_overrides or {}).items():
        cfg[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _log_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_train_writes_outputs_and_lowers_validation_error(tmp_path):
    config = _write_config(tmp_path, {"training": {"epochs": 6}})
    assert main(["train", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    for name in ("model.pt", "config.yaml", "log.csv", "test_metrics.json"):
        assert (out / name).is_file(), name
    rows = _log_rows(out / "log.csv")
    assert len(rows) == 6
    first, best = float(rows[0]["valid_forces_rmse"]), min(float(r["valid_forces_rmse"]) for r in rows)
    assert best < 0.8 * first
    metrics = json.loads((out / "test_metrics.json").read_text())["small"]
    assert set(metrics) >= {"energy", "forces"}
    assert set(metrics["forces"]) >= {"rmse", "mae", "nll", "miscalibration_area", "ence", "spearman",
                                      "coverage_68", "coverage_95", "sharpness"}
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["epochs"] == 6 and resolved["uq"]["method"] == "blip"


def test_train_without_recalibration_says_the_spreads_are_raw(tmp_path, capsys):
    config = _write_config(tmp_path, {"uq": {"samples": 2, "recalibrate": False}, "training": {"epochs": 1}})
    assert main(["train", str(config), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "uq.recalibrate is off" in err and "blip calibrate" in err
    assert blip.load(tmp_path / "out" / "model.pt").calibration == {"energy": 1.0, "forces": 1.0}


def test_resume_after_a_kill_gives_the_uninterrupted_model(tmp_path, monkeypatch):
    from blip.train.loop import Trainer

    extra = ["--quiet", "--set", "model.dtype=float64", "--set", "training.epochs=3"]
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
    full = _write_config(tmp_path / "full")
    assert main(["train", str(full), *extra]) == 0
    killed = _write_config(tmp_path / "killed")
    save = Trainer._save_checkpoint

    def save_then_die(self, member, epoch, *args, **kwargs):
        save(self, member, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    assert main(["train", str(killed), *extra]) == 130  # "blip: interrupted", as after Ctrl-C
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    assert main(["train", str(killed), *extra, "--resume"]) == 0
    rows = _log_rows(tmp_path / "killed" / "out" / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    a = blip.load(tmp_path / "full" / "out" / "model.pt").members[0].state_dict()
    b = blip.load(tmp_path / "killed" / "out" / "model.pt").members[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_writes_uncertainties_and_keeps_reference_labels(tiny_model_path, tmp_path):
    out = tmp_path / "pred.xyz"
    assert main(["predict", str(tiny_model_path), str(DATA / "acac_small.xyz"), "-o", str(out),
                 "--samples", "4", "--seed", "1", "--quiet"]) == 0
    frames = ase.io.read(out, ":")
    ref = ase.io.read(DATA / "acac_small.xyz", ":")
    assert len(frames) == len(ref)
    for f, r in zip(frames, ref):
        assert f.get_potential_energy() == pytest.approx(r.get_potential_energy())
        np.testing.assert_allclose(f.get_forces(), r.get_forces())
        assert f.info["blip_energy_std"] > 0
        assert f.arrays["blip_forces"].shape == (len(f), 3)
        assert np.all(f.arrays["blip_forces_std"] > 0)
    again = tmp_path / "again.xyz"
    main(["predict", str(tiny_model_path), str(DATA / "acac_small.xyz"), "-o", str(again),
          "--samples", "4", "--seed", "1", "--quiet"])
    assert ase.io.read(again, 0).info["blip_energy"] == frames[0].info["blip_energy"]


def test_python_api_contract(tiny_model_path):
    model = blip.load(tiny_model_path)
    atoms = ase.io.read(DATA / "acac_small.xyz", ":3")
    out = model.predict(atoms, samples=5, seed=0)
    assert out["energy"].shape == (3,) and out["energy_std"].shape == (3,)
    assert out["energy_samples"].shape == (5, 3)
    assert [f.shape for f in out["forces"]] == [(len(a), 3) for a in atoms]
    np.testing.assert_allclose(out["energy_std"], np.sqrt(np.mean((out["energy_samples"] - out["energy"]) ** 2, axis=0)))
    map_out = model.predict(atoms, samples=0)
    assert np.all(map_out["energy_std"] == 0) and all(np.all(s == 0) for s in map_out["forces_std"])
    # uq.predict_mean: map (default) predicts the noise-free pass, "samples" the sample mean
    np.testing.assert_allclose(out["energy"], map_out["energy"], rtol=0, atol=1e-9)
    model.config["uq"]["predict_mean"] = "samples"
    out = model.predict(atoms, samples=5, seed=0)
    np.testing.assert_allclose(out["energy"], out["energy_samples"].mean(0))
    assert not np.allclose(out["energy"], map_out["energy"], rtol=0, atol=1e-6)


def test_evaluate_json_and_report(tiny_model_path, tmp_path):
    js, report = tmp_path / "m.json", tmp_path / "report"
    assert main(["evaluate", str(tiny_model_path), str(DATA / "acac_small.xyz"), "--samples", "4",
                 "--json", str(js), "--report", str(report), "--quiet"]) == 0
    metrics = json.loads(js.read_text())
    for quantity in ("energy", "forces"):
        for key in ("rmse", "mae", "nll", "miscalibration_area", "ence", "spearman", "coverage_68",
                    "coverage_95", "sharpness"):
            assert key in metrics[quantity]
    assert metrics["forces"]["n"] == 5 * 15 * 3
    assert len(list(report.glob("*.png"))) >= 2 and (report / "report.md").is_file()


def test_calibrate_set_changes_one_recalibration_setting(tiny_model_path, tmp_path, capsys):
    """`blip calibrate --set uq.KEY=VALUE` recalibrates with that setting, stores it, leaves every other key."""
    valid = str(DATA / "acac_small.xyz")
    args = ["calibrate", str(tiny_model_path), valid, "--samples", "4", "--quiet"]
    widened, off = tmp_path / "widened.pt", tmp_path / "off.pt"
    assert main(args + ["-o", str(widened), "--set", "uq.energy_novelty_widening=0.3"]) == 0
    assert main(args + ["-o", str(off), "--set", "uq.energy_novelty_widening=false"]) == 0
    before, after = blip.load(tiny_model_path), blip.load(widened)
    assert after.config["uq"]["energy_novelty_widening"] == 0.3 and after.calibration["energy_novelty"] == 0.3
    assert "energy_novelty" not in blip.load(off).calibration
    rest = [key for key in before.config["uq"] if key != "energy_novelty_widening"]
    assert {k: after.config["uq"][k] for k in rest} == {k: before.config["uq"][k] for k in rest}
    assert after.config["model"] == before.config["model"] and after.config["training"] == before.config["training"]
    capsys.readouterr()
    bad = tmp_path / "bad.pt"
    assert main(args + ["-o", str(bad), "--set", "uq.prior_p=0.1"]) == 2  # a training setting
    assert "recalibration settings only" in capsys.readouterr().err
    assert main(args + ["-o", str(bad), "--set", "uq.energy_novelty_widening=-1"]) == 2
    assert "must be true, false or a number" in capsys.readouterr().err
    assert not bad.exists()


def test_calibrate_scales_the_spread(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(tiny_model_path), str(DATA / "acac_small.xyz"), "-o", str(out),
                 "--samples", "4", "--quiet"]) == 0
    before, after = blip.load(tiny_model_path), blip.load(out)
    said = capsys.readouterr().out
    c = after.calibration["forces_structure_floor"]  # printed when fitted
    assert (f"a floor of {c:.3g} eV/Å" in said) if c > 0 else ("per structure" not in said)
    factor = after.calibration["forces"]
    assert factor > 0 and factor != 1.0
    assert after.fitted_force_std in ("atom", "component")  # uq.force_std auto: calibrate chose one
    before.fitted_force_std = after.fitted_force_std  # the same spread, not scaled
    atoms = ase.io.read(DATA / "acac_small.xyz", ":2")
    plain = before.predict(atoms, samples=4, seed=3, novelty=True)
    s0, nu = plain["forces_std"][0], plain["atom_novelty"][0]
    s1 = after.predict(atoms, samples=4, seed=3)["forces_std"][0]
    # uq.novelty_widening: each atom's spread also x exp(b (nu - nu_0)), b set (default 0.1) or fitted
    widening = np.exp(after.calibration["forces_novelty"] * (nu - after.calibration["novelty_centre"]))
    assert after.calibration["forces_novelty"] >= 0.0
    floor = after.calibration["forces_floor"]  # uq.force_std_floor x the validation force RMSE, in quadrature
    assert floor > 0
    # uq.structure_floor: a floor of the whole structure from its atoms' mean distance, in quadrature too
    per_structure = structure_floor(nu.mean(), after.calibration)
    np.testing.assert_allclose(s1, np.sqrt((factor * s0 * widening[:, None]) ** 2 + floor ** 2 + per_structure ** 2),
                               rtol=1e-6)


# -- bad input: one line, non-zero exit, no partial output ------------------------------------

def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("blip: error:")
    return err[-1]


def test_bad_training_data(tmp_path, capsys):
    frames = ase.io.read(DATA / "acac_small.xyz", ":")
    frames[2].calc = None
    bad = tmp_path / "missing_energy.xyz"
    ase.io.write(bad, frames)
    config = _write_config(tmp_path, {"data": {"train_file": str(bad), "max_train": None}})
    line = _error(capsys, ["train", str(config), "--quiet"])
    assert "missing_energy.xyz" in line and "structure 2" in line and "energy" in line
    assert not (tmp_path / "out" / "model.pt").exists()


def test_nan_forces(tmp_path, capsys):
    text = (DATA / "acac_small.xyz").read_text().splitlines()
    fields = text[3].split()
    fields[5] = "nan"
    text[3] = "  ".join(fields)
    bad = tmp_path / "nan.xyz"
    bad.write_text("\n".join(text) + "\n")
    config = _write_config(tmp_path, {"data": {"train_file": str(bad), "max_train": None}})
    line = _error(capsys, ["train", str(config), "--quiet"])
    assert "nan.xyz" in line and "structure 0" in line


def test_unknown_config_key(tmp_path, capsys):
    config = _write_config(tmp_path, {"training": {"epochz": 3}})
    assert "training.epochz" in _error(capsys, ["train", str(config), "--quiet"])


def test_unknown_element_at_prediction(tiny_model_path, tmp_path, capsys):
    frames = ase.io.read(DATA / "acac_small.xyz", ":2")
    frames[1].numbers[0] = 14
    bad = tmp_path / "si_in_acac.xyz"
    ase.io.write(bad, frames)
    out = tmp_path / "p.xyz"
    line = _error(capsys, ["predict", str(tiny_model_path), str(bad), "-o", str(out), "--quiet"])
    assert "si_in_acac.xyz" in line and "structure 1" in line and "Si" in line
    assert not out.exists() and not list(tmp_path.glob(".p.xyz*"))


@pytest.mark.parametrize("content", ["", "this is not a structure file\nat all\n"])
def test_empty_or_foreign_input_file(tiny_model_path, tmp_path, capsys, content):
    bad = tmp_path / "input.xyz"
    bad.write_text(content)
    out = tmp_path / "p.xyz"
    assert "input.xyz" in _error(capsys, ["predict", str(tiny_model_path), str(bad), "-o", str(out), "--quiet"])
    assert not out.exists()


def test_corrupt_and_foreign_checkpoints(tiny_model_path, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_model_path.read_bytes()[:1000])
    assert "corrupt.pt" in _error(capsys, ["predict", str(corrupt), str(DATA / "acac_small.xyz"), "-o",
                                           str(tmp_path / "p.xyz"), "--quiet"])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    line = _error(capsys, ["evaluate", str(foreign), str(DATA / "acac_small.xyz"), "--quiet"])
    assert "foreign.pt" in line and "not a BLIP model" in line


def test_config_resolution_and_overrides(tmp_path):
    cfg = tiny_config(tmp_path, uq={"beta": 2.0})
    assert cfg["uq"]["beta"] == 2.0 and cfg["model"]["features"] == 16
    from blip import config
    from blip.errors import ConfigError

    assert config.parse_override("training.lr=0.01") == {"training": {"lr": 0.01}}
    # YAML 1.1 reads 1e-4 (no dot) as a string: numbers so written still count as numbers
    written = config.resolve({"uq": {"novelty_widening": "2e-1"}}, ["uq.force_std_floor=1e-2", "training.lr=5e-3"])
    assert written["uq"]["force_std_floor"] == 0.01 and written["training"]["lr"] == 5e-3
    assert written["uq"]["novelty_widening"] == 0.2
    with pytest.raises(ConfigError, match="model.backbone"):
        config.resolve({"model": {"backbone": "schnet"}})
    with pytest.raises(ConfigError, match="model.pretrained"):
        config.resolve({"model": {"backbone": "painn", "pretrained": True}})


def test_pretrained_models_get_the_finetuning_defaults_and_user_keys_win():
    pytest.importorskip("chgnet")
    from blip import config

    scratch = config.resolve({"model": {"backbone": "chgnet", "pretrained": False}})
    finetune = config.resolve({"model": {"backbone": "chgnet"}})  # CHGNet is pretrained by default
    assert finetune["model"]["pretrained"] is True
    for section, values in config.FINETUNE_DEFAULTS.items():
        for key, value in values.items():
            assert finetune[section][key] == value, (section, key)
            assert scratch[section][key] == config.DEFAULTS[section][key], (section, key)
    assert scratch["uq"]["distance_metric"] == "auto" and finetune["uq"]["distance_metric"] == "mahalanobis"
    assert scratch["uq"]["distance_offset"] == 0.05 and finetune["uq"]["distance_offset"] == 1.0
    assert scratch["uq"]["distance_slope"] == "auto" and finetune["uq"]["distance_slope"] == 1.0
    assert scratch["uq"]["noise_draws"] == "structure" and finetune["uq"]["noise_draws"] == "row"
    mine = config.resolve({"model": {"backbone": "chgnet"}, "uq": {"p_max": 0.2}, "training": {"inference_lr": None}},
                          ["training.lr=0.001"])
    assert mine["uq"]["p_max"] == 0.2 and mine["training"]["lr"] == 0.001 and mine["training"]["inference_lr"] is None
    assert mine["uq"]["p_init"] == config.FINETUNE_DEFAULTS["uq"]["p_init"]


def test_overlapping_atoms_are_one_error_and_no_output(tiny_model_path, tmp_path, capsys):
    frames = ase.io.read(DATA / "acac_small.xyz", ":2")
    frames[1].positions[3] = frames[1].positions[0]
    bad = tmp_path / "overlap.xyz"
    ase.io.write(bad, frames)
    out = tmp_path / "p.xyz"
    line = _error(capsys, ["predict", str(tiny_model_path), str(bad), "-o", str(out), "--quiet"])
    assert "overlap.xyz" in line and "structure 1" in line and "atoms 0 and 3" in line and "apart" in line
    assert not out.exists()


def test_evaluate_without_labels_is_an_error(tiny_model_path, tmp_path, capsys):
    frames = ase.io.read(DATA / "acac_small.xyz", ":2")
    for a in frames:
        a.calc = None
    bare = tmp_path / "bare.xyz"
    ase.io.write(bare, frames)
    line = _error(capsys, ["evaluate", str(tiny_model_path), str(bare), "--quiet"])
    assert "bare.xyz" in line and "no reference labels" in line


@pytest.mark.parametrize("args, message", [
    (["--set", "training.epochs=abc"], "training.epochs must be an integer, got 'abc'"),
    (["--set", "training.lr=-1"], "training.lr must be in (0.0, inf), got -1"),
    (["--set", "training.lr=fast"], "training.lr must be a number, got 'fast'"),
    (["--set", "training.scheduler=plateau"], "training.scheduler must be cosine or constant"),
    (["--set", "uq.p_init=0.9"], "p_min <= p_init <= p_max"),
    (["--set", "uq.distance_shrinkage=1.5"], "uq.distance_shrinkage must be in [0.0, 1.0], got 1.5"),
    (["--set", "uq.distance_metric=cosine"], "uq.distance_metric must be one of euclidean, mahalanobis"),
    (["--set", "training.resume=yes please"], "training.resume must be true or false"),
    (["--set", "uq.noise_draws=atom"], "uq.noise_draws 'atom' is not one of structure, row"),
    (["--set", "uq.backbone_training=map"], "uq.backbone_training must be sampled, noise_free or auto"),
    (["--set", "uq.rate_every=0"], "uq.rate_every must be in [1, inf), got 0"),
])
def test_bad_config_values_are_one_error_before_training(tmp_path, capsys, args, message):
    config = _write_config(tmp_path)
    assert message in _error(capsys, ["train", str(config), "--quiet", *args])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "md"])
def test_negative_samples_is_a_usage_error(tiny_model_path, tmp_path, capsys, command):
    extra = {"predict": ["-o", str(tmp_path / "p.xyz")], "evaluate": [], "md": ["-o", str(tmp_path / "t.xyz")]}
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(tiny_model_path), str(DATA / "acac_small.xyz"), "--samples", "-3", *extra[command]])
    assert exit_info.value.code == 2
    assert "--samples: must be >= 0, got -3" in capsys.readouterr().err


def test_md_of_a_single_atom_runs_at_a_finite_temperature(tiny_model_path, tmp_path):
    from ase import Atoms

    start = tmp_path / "atom.xyz"
    ase.io.write(start, Atoms("C", positions=[[0.0, 0.0, 0.0]]))
    out = tmp_path / "t.xyz"
    assert main(["md", str(tiny_model_path), str(start), "-o", str(out), "--steps", "4", "--quiet"]) == 0
    frames = ase.io.read(out, ":")
    assert all(np.isfinite(f.info["temperature_K"]) for f in frames) and frames[0].info["temperature_K"] == 0


def test_recalibration_uses_a_separate_calibration_split_when_given(tmp_path, capsys):
    from blip.train.datasets import prepare_data

    config = _write_config(tmp_path, {"data": {"calibration_fraction": 0.25, "max_train": None},
                                      "training": {"epochs": 1}})
    cfg = blip.config.load(config)
    data = prepare_data(cfg)
    ids = lambda structures: {s.index for s in structures}  # noqa: E731
    assert data.calibration and not ids(data.calibration) & (ids(data.train) | ids(data.valid))
    assert main(["train", str(config), "--quiet"]) == 0
    assert f"recalibrated on the calibration set ({len(data.calibration)})" in capsys.readouterr().err
    both = ["--set", f"data.calibration_file={DATA / 'acac_small.xyz'}"]
    assert "not both" in _error(capsys, ["train", str(config), "--quiet", *both])
