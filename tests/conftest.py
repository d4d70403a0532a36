"""Shared fixtures: tiny real data and a tiny trained BLIP-PaiNN model (session scoped)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

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
    cells = []
    for seed in (0, 1):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.1, seed=seed)
        cells.append(atoms)
    return cells


def pulled_out(atoms, index: int, gap: float):
    """Copy of a molecule with atom ``index`` moved straight out from the others' centroid until
    its nearest other atom is ``gap`` Angstrom away (bisection along the ray)."""
    out = atoms.copy()
    others = np.delete(out.positions, index, axis=0)
    centre = others.mean(axis=0)
    ray = out.positions[index] - centre
    ray /= np.linalg.norm(ray)
    low, high = 0.0, 100.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if np.linalg.norm(others - (centre + mid * ray), axis=1).min() < gap else (low, mid)
    out.positions[index] = centre + high * ray
    return out


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


def lj_si_cells(n: int, seed: int = 0) -> list:
    """``n`` Si cells (8 atoms), rattled and strained by up to 4 %, labelled by Lennard-Jones
    (energy, forces, stress) and stored as an extxyz reader leaves them (labels in atoms.calc)."""
    rng = np.random.default_rng(seed)
    lj = LennardJones(sigma=2.09, epsilon=0.5, rc=4.0, smooth=True)
    out = []
    for k in range(n):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        eps = rng.uniform(-0.04, 0.04, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.rattle(0.08, seed=seed * 1000 + k)
        atoms.calc = lj
        labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                  "stress": atoms.get_stress()}
        atoms.calc = SinglePointCalculator(atoms, **labels)
        out.append(atoms)
    return out


@pytest.fixture(scope="session")
def lj_si_files(tmp_path_factory):
    """A folder with train.xyz (24) and test.xyz (8) Lennard-Jones-labelled Si cells."""
    here = tmp_path_factory.mktemp("lj_si")
    ase.io.write(here / "train.xyz", lj_si_cells(24, seed=0), format="extxyz")
    ase.io.write(here / "test.xyz", lj_si_cells(8, seed=1), format="extxyz")
    return here


def train_lj_si(si_files, tmp, stress_weight: float, epochs: int = 3):
    """A tiny float64 BLIP-PaiNN (cutoff 4 A) trained on ``si_files/train.xyz``."""
    from blip.train.loop import Trainer

    cfg = config.resolve({
        "data": {"train_file": str(si_files / "train.xyz"), "valid_fraction": 0.2, "e0s": {14: 0.0}},
        "model": {"backbone": "painn", "cutoff": 4.0, "features": 16, "interactions": 2, "radial": 8,
                  "dtype": "float64"},
        "uq": {"samples": 4},
        "training": {"epochs": epochs, "batch_size": 4, "lr": 0.005, "seed": 0, "patience": 50,
                     "stress_weight": stress_weight},
        "output_dir": str(tmp / f"run_{stress_weight:g}"),
    })
    return Trainer(cfg, progress=False).run()


@pytest.fixture(scope="session")
def lj_si_model(lj_si_files, tmp_path_factory):
    return train_lj_si(lj_si_files, tmp_path_factory.mktemp("si_model"), stress_weight=0.0)
