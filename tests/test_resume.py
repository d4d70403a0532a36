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


def test_weight_average_equals_torch_averaged_model_and_loads_its_checkpoints():
    """ExponentialAverage (one multi-tensor kernel per step) = AveragedModel with the same warm-up EMA:
    parameters averaged, buffers copied, the same state-dict keys (old checkpoints load), and a
    loaded average continues from the loaded count."""
    from torch.optim.swa_utils import AveragedModel

    from blip.train.ema import ExponentialAverage

    decay = 0.9

    def warm_up(averaged, current, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    net.register_buffer("statistic", torch.zeros(5, dtype=torch.float64))
    ours, reference = ExponentialAverage(net, decay), AveragedModel(net, multi_avg_fn=torch.no_grad()(warm_up))
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for step in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.statistic.fill_(step)
        ours.update_parameters(net)
        reference.update_parameters(net)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-15, atol=0)
    assert float(ours.module.statistic[0]) == 11.0  # copied, not averaged

    restored = ExponentialAverage(net, decay)
    restored.load_state_dict(reference.state_dict())  # a checkpoint of the AveragedModel era
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    restored.update_parameters(net)
    reference.update_parameters(net)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=1e-15, atol=0)
