"""Shared fixtures: tiny real data and a tiny trained BLIP-PaiNN model (session scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip import config
from blip.backbones.base import DatasetSummary
from blip.data import read_labelled

TESTS = Path(__file__).parent
DATA = TESTS / "data"
EXAMPLES = TESTS.parent / "examples"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny graphs run faster on one torch thread (and far faster than two on a busy 2-core machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def acac_small():
    """5 labelled acetylacetone structures (Structure objects)."""
    return read_labelled(DATA / "acac_small.xyz")


@pytest.fixture(scope="session")
def acac_summary(acac_small):
    return DatasetSummary(elements=[1, 6, 8], e0s={1: -13.6, 6: -1026.9, 8: -2037.8},
                          energy_shift=-1.0, force_scale=1.0)


def rattled_si_cells() -> list:
    """Two small periodic Si cells (8 atoms each, rattled by 0.1 A, seeds 0 and 1): fast for many passes."""
    from ase.build import bulk

    cells = []
    for seed in (0, 1):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.1, seed=seed)
        cells.append(atoms)
    return cells


def tiny_config(tmp_path, **sections) -> dict:
    """A resolved config for a tiny PaiNN trained on examples/acac (first structures)."""
    user = {
        "data": {"train_file": str(EXAMPLES / "acac" / "train_300K.xyz"), "max_train": 40,
                 "valid_fraction": 0.1, "e0s": str(EXAMPLES / "acac" / "isolated_atoms.xyz")},
        "model": {"backbone": "painn", "features": 16, "interactions": 2, "radial": 8},
        "uq": {"samples": 4},
        "training": {"epochs": 3, "batch_size": 8, "lr": 0.005, "seed": 0, "patience": 50},
        "output_dir": str(tmp_path / "run"),
    }
    for name, values in sections.items():
        user.setdefault(name, {}).update(values)
    return config.resolve(user)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Path of a tiny BLIP-PaiNN model.pt trained for a few epochs (shared by tests)."""
    from blip.train.loop import Trainer

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    Trainer(cfg, progress=False).run()
    return Path(cfg["output_dir"]) / "model.pt"
