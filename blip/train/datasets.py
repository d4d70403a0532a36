"""Training data: read, split, E0s and the statistics a backbone is built from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backbones.base import DatasetSummary
from ..data import build_graph, read_labelled, resolve_e0s
from ..errors import ConfigError


@dataclass
class PreparedData:
    train: list  # list[Structure]
    valid: list
    tests: dict  # name -> list[Structure]
    summary: DatasetSummary
    calibration: list | None = None  # recalibration set when separate from ``valid``


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, valid) index split with at least one structure in each part."""
    if n < 2:
        raise ConfigError("need at least 2 training structures to split off a validation set")
    order = np.random.default_rng(seed).permutation(n)
    n_valid = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def summarise(structures, e0s: dict[int, float], cutoff: float) -> DatasetSummary:
    """Elements, E0s, mean energy per atom above E0s (eV), RMS force (eV/A), mean neighbours."""
    elements = sorted({int(z) for s in structures for z in s.atoms.numbers})
    residual, forces, neighbours, atoms = [], [], 0, 0
    for s in structures:
        ref = sum(e0s.get(int(z), 0.0) for z in s.atoms.numbers)
        residual.append((s.energy - ref) / len(s.atoms))
        forces.append(np.asarray(s.forces).ravel())
    for s in structures[:200]:
        neighbours += int(build_graph(s.atoms, cutoff)["n_edges"][0])
        atoms += len(s.atoms)
    rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 1.0
    return DatasetSummary(elements=elements, e0s={int(z): float(e0s.get(z, 0.0)) for z in elements},
                          energy_shift=float(np.mean(residual)), force_scale=rms if rms > 0 else 1.0,
                          avg_num_neighbors=neighbours / max(atoms, 1))


def prepare_data(cfg: dict) -> PreparedData:
    """Read and split the files named in ``cfg["data"]``; test sets may lack labels."""
    d = cfg["data"]
    seed = int(cfg["training"]["seed"])
    if not d["train_file"]:
        raise ConfigError("data.train_file is required")
    ek, fk, sk = d["energy_key"], d["forces_key"], d["stress_key"]
    train = read_labelled(d["train_file"], ek, fk, stress_key=sk)
    if d["valid_file"]:
        valid = read_labelled(d["valid_file"], ek, fk, stress_key=sk)
    else:
        t, v = split_indices(len(train), float(d["valid_fraction"]), seed)
        train, valid = [train[i] for i in t], [train[i] for i in v]
    calibration = None
    if d["calibration_file"]:
        calibration = read_labelled(d["calibration_file"], ek, fk, stress_key=sk)
    elif d["calibration_fraction"]:
        t, c = split_indices(len(train), float(d["calibration_fraction"]), seed + 2)
        train, calibration = [train[i] for i in t], [train[i] for i in c]
    if d["max_train"]:
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(train))[: int(d["max_train"])])
        train = [train[i] for i in keep]
    tests = {name: read_labelled(path, ek, fk, require_energy=False, require_forces=False, stress_key=sk)
             for name, path in d["test_files"].items()}
    e0s = resolve_e0s(d["e0s"], train + valid, ek)
    return PreparedData(train, valid, tests, summarise(train, e0s, float(cfg["model"]["cutoff"])), calibration)
