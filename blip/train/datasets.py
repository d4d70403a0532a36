"""Training data: read, split, E0s and the statistics a backbone is built from."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..backbones.base import DatasetSummary
from ..data import all_periodic, build_graph, read_labelled, resolve_e0s
from ..data.e0s import composition, e0s_from_counts
from ..data.hdf5 import H5Store, H5Structures, is_dataset, write_dataset, write_header
from ..data.io import iter_labelled
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
    """Elements, E0s, mean energy per atom above E0s (eV), RMS force (eV/A), mean neighbours, periodicity."""
    elements, counts = composition(structures)
    return summary_from_arrays(elements, counts, np.array([s.energy for s in structures], dtype=np.float64),
                               np.array([float(np.sum(np.asarray(s.forces) ** 2)) for s in structures]),
                               [s.atoms for s in structures[:200]], e0s, cutoff)


def summary_from_arrays(elements, counts, energies, force_sq, first_atoms, e0s, cutoff) -> DatasetSummary:
    """:func:`summarise` from per-structure arrays (what a streamed data set keeps): element counts
    (structures, elements), energies, sums of squared force components, and the first (up to
    200) structures for the mean number of neighbours and whether the data are periodic crystals.
    Both paths use this, so they agree exactly."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts.sum(axis=0) > 0
    elements = [int(z) for z, k in zip(elements, present) if k]
    counts = counts[:, present]
    n_atoms = counts.sum(axis=1)
    ref = counts @ np.array([e0s.get(z, 0.0) for z in elements], dtype=np.float64)
    residual = (np.asarray(energies, dtype=np.float64) - ref) / n_atoms
    neighbours = atoms = 0
    for a in first_atoms:
        neighbours += int(build_graph(a, cutoff)["n_edges"][0])
        atoms += len(a)
    total = float(np.sum(n_atoms))
    rms = float(np.sqrt(np.sum(force_sq) / (3.0 * total))) if total else 1.0
    return DatasetSummary(elements=elements, e0s={int(z): float(e0s.get(z, 0.0)) for z in elements},
                          energy_shift=float(np.mean(residual)), force_scale=rms if rms > 0 else 1.0,
                          avg_num_neighbors=neighbours / max(atoms, 1),
                          periodic=all_periodic(first_atoms))


def _take(structures, idx):
    return structures.subset(idx) if hasattr(structures, "subset") else [structures[i] for i in idx]


def _split(cfg: dict, train, valid_reader, calibration_reader):
    """The train / valid / calibration split of ``prepare_data`` (the same for lists and streams)."""
    d, seed = cfg["data"], int(cfg["training"]["seed"])
    if d["valid_file"]:
        valid = valid_reader(d["valid_file"])
    else:
        t, v = split_indices(len(train), float(d["valid_fraction"]), seed)
        train, valid = _take(train, t), _take(train, v)
    calibration = None
    if d["calibration_file"]:
        calibration = calibration_reader(d["calibration_file"])
    elif d["calibration_fraction"]:
        t, c = split_indices(len(train), float(d["calibration_fraction"]), seed + 2)
        train, calibration = _take(train, t), _take(train, c)
    if d["max_train"]:
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(train))[: int(d["max_train"])])
        train = _take(train, keep)
    return train, valid, calibration


def split_spec(cfg: dict) -> dict:
    """The config keys the split and the statistics depend on (a preprocessed header records them)."""
    d = cfg["data"]
    return {k: d[k] for k in ("valid_file", "valid_fraction", "calibration_file", "calibration_fraction",
                              "max_train", "e0s")} | {"seed": int(cfg["training"]["seed"]),
                                                      "cutoff": float(cfg["model"]["cutoff"])}


def prepare_data(cfg: dict) -> PreparedData:
    """Read and split the files named in ``cfg["data"]``; test sets may lack labels.

    ``data.train_file`` may be a folder written by ``blip preprocess``: the structures then stay
    on disk (HDF5 shards) and are read when a batch needs them."""
    d = cfg["data"]
    if not d["train_file"]:
        raise ConfigError("data.train_file is required")
    ek, fk, sk = d["energy_key"], d["forces_key"], d["stress_key"]
    read = lambda path: read_labelled(path, ek, fk, stress_key=sk)  # noqa: E731
    if is_dataset(d["train_file"]):
        store = H5Store(d["train_file"])
        train, valid, calibration = _split(cfg, H5Structures(store), read, read)
        summary = _streamed_summary(cfg, store, train, valid)
    else:
        train, valid, calibration = _split(cfg, read(d["train_file"]), read, read)
        e0s = resolve_e0s(d["e0s"], train + valid, ek)
        summary = summarise(train, e0s, float(cfg["model"]["cutoff"]))
    tests = {name: read_labelled(path, ek, fk, require_energy=False, require_forces=False, stress_key=sk)
             for name, path in d["test_files"].items()}
    return PreparedData(train, valid, tests, summary, calibration)


def _streamed_summary(cfg, store, train, valid) -> DatasetSummary:
    """Statistics of a streamed training set: the header's when it was preprocessed for the same
    split (and written by a version that records the periodicity), else recomputed from the
    per-structure arrays of the shards and the first 200 structures."""
    stats = store.header.get("statistics")
    if stats and stats.get("split") == json.loads(json.dumps(split_spec(cfg))) and "periodic" in stats["summary"]:
        s = stats["summary"]
        return DatasetSummary(elements=[int(z) for z in s["elements"]], e0s={int(z): float(v) for z, v in s["e0s"].items()},
                              energy_shift=float(s["energy_shift"]), force_scale=float(s["force_scale"]),
                              avg_num_neighbors=float(s["avg_num_neighbors"]), periodic=bool(s["periodic"]))
    return streamed_statistics(cfg, store, train, valid)


def streamed_statistics(cfg, store, train, valid) -> DatasetSummary:
    """E0s (least squares on element counts, or as configured) and :func:`summary_from_arrays` of a
    streamed training set, one shard at a time."""
    elements = store.elements()
    counts, energies, force_sq = store.composition(elements), store.per_structure("energy"), store.per_structure("force_sq")
    if isinstance(valid, H5Structures):
        both = np.concatenate([train.indices, valid.indices])
        rows, e_rows = counts[both], energies[both]
    else:  # a separate validation file, in memory
        v_el, v_counts = composition(valid, elements)
        rows = np.concatenate([counts[train.indices], v_counts])
        e_rows = np.concatenate([energies[train.indices], [s.energy for s in valid]])
    present = [z for z, k in zip(elements, rows.sum(axis=0) > 0) if k]
    e0s = resolve_e0s(cfg["data"]["e0s"], None, cfg["data"]["energy_key"], elements=present,
                      fit=lambda: e0s_from_counts(elements, rows, e_rows))
    first = [train[k].atoms for k in range(min(200, len(train)))]
    return summary_from_arrays(elements, counts[train.indices], energies[train.indices], force_sq[train.indices],
                               first, e0s, float(cfg["model"]["cutoff"]))


def preprocess(cfg: dict, out_dir, shard_size: int = 10000) -> dict:
    """``blip preprocess``: ``data.train_file`` to HDF5 shards in ``out_dir`` plus header.json with
    the statistics training needs first (for this config's split); returns the header."""
    d = cfg["data"]
    if not d["train_file"]:
        raise ConfigError("data.train_file is required")
    header = write_dataset(iter_labelled(d["train_file"], d["energy_key"], d["forces_key"],
                                         stress_key=d["stress_key"]), out_dir,
                           shard_size=shard_size, source=d["train_file"])
    write_header(out_dir, header)
    store = H5Store(out_dir)
    read = lambda path: read_labelled(path, d["energy_key"], d["forces_key"], stress_key=d["stress_key"])  # noqa: E731
    train, valid, _ = _split(cfg, H5Structures(store), read, read)
    summary = streamed_statistics(cfg, store, train, valid)
    header["statistics"] = {"split": json.loads(json.dumps(split_spec(cfg))), "n_train": len(train),
                            "n_valid": len(valid),
                            "summary": {"elements": summary.elements, "e0s": {str(z): v for z, v in summary.e0s.items()},
                                        "energy_shift": summary.energy_shift, "force_scale": summary.force_scale,
                                        "avg_num_neighbors": summary.avg_num_neighbors,
                                        "periodic": summary.periodic}}
    write_header(out_dir, header)
    return header
