"""Resume is exact: a run killed after a checkpoint and resumed gives the uninterrupted run's model."""

from __future__ import annotations

import math

import pytest
import torch

from blip.train.loop import Trainer
from conftest import tiny_config


def _config(tmp_path, method):
    return tiny_config(tmp_path, model={"dtype": "float64"}, data={"max_train": 16},
                       uq={"method": method, "ensemble_size": 2},
                       training={"epochs": 3, "batch_size": 4, "patience": 50})


@pytest.mark.parametrize("method, kill_after", [("blip", 2), ("ensemble", 4)])  # ensemble: in member 1
def test_resumed_run_gives_the_same_model_as_an_uninterrupted_one(tmp_path, monkeypatch, method, kill_after):
    full = Trainer(_config(tmp_path / "full", method), progress=False).run()

    cfg = _config(tmp_path / "killed", method)
    saved = {"n": 0}
    save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saved["n"] += 1
        if saved["n"] == kill_after:
            raise KeyboardInterrupt  # killed right after a checkpoint was written

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False).run()
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    cfg["training"]["resume"] = True
    resumed = Trainer(cfg, progress=False).run()

    assert len(resumed.members) == len(full.members) == (2 if method == "ensemble" else 1)
    for a, b in zip(full.members, resumed.members):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_all_nan_validation_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_validate", lambda self, model, graphs: {
        "valid_loss": math.nan, "valid_energy_rmse_per_atom": math.nan, "valid_forces_rmse": math.nan})
    cfg = _config(tmp_path, "blip")
    cfg["training"]["epochs"] = 1
    with pytest.raises(FloatingPointError, match="every validation loss was NaN"):
        Trainer(cfg, progress=False).run()
