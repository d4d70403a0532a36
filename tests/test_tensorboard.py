"""TensorBoard event files beside log.csv with the loss terms, KL, noise rate, RMSEs and LR."""

from __future__ import annotations

import pytest

from blip.train.loop import Trainer
from conftest import tiny_config

pytest.importorskip("tensorboard")


def test_event_files_have_the_expected_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, data={"max_train": 6}, training={"epochs": 2, "batch_size": 3})
    Trainer(cfg, progress=False).run()
    out = tmp_path / "run"
    assert list(out.glob("events.out.tfevents.*")) and (out / "log.csv").is_file()
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/data_loss", "train/kl", "train/mean_noise_rate", "train/contrastive_kl",
            "valid/loss", "valid/energy_rmse_per_atom", "valid/forces_rmse", "lr"} <= tags
    assert [e.step for e in acc.Scalars("valid/forces_rmse")] == [0, 1]


def test_tensorboard_off(tmp_path):
    cfg = tiny_config(tmp_path, data={"max_train": 4}, training={"epochs": 1, "batch_size": 4, "tensorboard": False})
    Trainer(cfg, progress=False).run()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
