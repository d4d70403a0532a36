"""``uq.backbone_training``: noise_free trains BLIP's backbone exactly as the plain model, its rate heads alone."""

from __future__ import annotations

import pytest
import torch

from blip.build import backbone_training, build_potential
from blip.train.datasets import prepare_data
from blip.train.loop import Trainer, seed_everything
from conftest import tiny_config


def _train(tmp_path, method: str, **uq):
    cfg = tiny_config(tmp_path, uq={"method": method, **uq}, data={"max_train": 16}, training={"epochs": 2})
    return cfg, Trainer(cfg, progress=False).run().members[0]


def _largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference of the two modules' parameters (the same architecture)."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in pairs)


@pytest.fixture(scope="module")
def plain_backbone(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plain"), "deterministic")[1].backbone


def test_noise_free_backbone_training_gives_the_plain_models_weights_and_trains_the_rates(tmp_path, plain_backbone):
    cfg, blip = _train(tmp_path, "blip", backbone_training="noise_free", rate_every=2)
    # the backbone took the plain model's steps on the same batches: the same weights
    assert _largest_difference(blip.backbone, plain_backbone) < 1e-6
    seed_everything(int(cfg["training"]["seed"]))
    start = build_potential(cfg, prepare_data(cfg).summary)  # the weights training started from
    assert _largest_difference(blip.backbone, start.backbone) > 1e-3
    assert _largest_difference(blip.inference, start.inference) > 1e-4  # the rate heads learned too


def test_sampled_backbone_training_moves_the_weights_away_from_the_plain_models(tmp_path, plain_backbone):
    _, blip = _train(tmp_path, "blip", backbone_training="sampled")
    assert _largest_difference(blip.backbone, plain_backbone) > 1e-4


@pytest.mark.parametrize("backbone, expected", [("mace", "noise_free"), ("painn", "sampled"), ("chgnet", "sampled")])
def test_backbone_training_auto_resolves_by_backbone(backbone, expected):
    assert backbone_training({"uq": {"backbone_training": "auto"}, "model": {"backbone": backbone}}) == expected
    assert backbone_training({"uq": {"backbone_training": "sampled"}, "model": {"backbone": backbone}}) == "sampled"
