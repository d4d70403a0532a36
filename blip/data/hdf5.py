"""Labelled structures in HDF5 shards, for training sets larger than memory (``blip preprocess``).

A data set is a folder: ``header.json`` (format, shards, per-shard counts, the statistics a
backbone is built from) and ``shard-NNNNN.h5`` files, each with attributes ``format``
("blip-hdf5-shard"), ``version``, ``shard``, ``n_structures``, ``n_atoms`` and datasets

* per atom (A rows): ``numbers`` int64, ``positions`` (A, 3) float64 Angstrom, ``forces`` (A, 3) eV/A;
* per structure (n rows): ``offsets`` (n + 1) int64 (atoms of structure j are
  ``offsets[j]:offsets[j+1]``), ``cell`` (n, 3, 3), ``pbc`` (n, 3) bool, ``energy`` (n,) eV,
  ``stress`` (n, 6) Voigt eV/A^3 (NaN where absent), ``force_sq`` (n,) (sum of squared force
  components: the force scale without reading the forces), ``source_index`` (n,).

Training reads structures one at a time (each rank only those of its batches, neighbour lists
in DataLoader workers). Files are opened lazily in each process (h5py handles do not survive a
fork). A truncated, foreign or inconsistent shard raises :class:`blip.errors.DataError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ase
import numpy as np

from blip.data.io import Structure, full_to_voigt, voigt_to_full
from blip.errors import DataError

FORMAT, SHARD_FORMAT, VERSION = "blip-hdf5", "blip-hdf5-shard", 1
HEADER = "header.json"


def _stress(structure: Structure) -> np.ndarray:
    """The structure's stress label as a Voigt 6-vector (NaN where it has none)."""
    return np.full(6, np.nan) if structure.stress is None else full_to_voigt(structure.stress)


def _write_shard(path: Path, index: int, structures: list) -> dict:
    import h5py

    from blip._files import atomic_path

    sizes = np.array([len(s.atoms) for s in structures], dtype=np.int64)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": SHARD_FORMAT, "version": VERSION, "shard": index,
                            "n_structures": len(structures), "n_atoms": int(sizes.sum())})
            f["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            f["numbers"] = np.concatenate([s.atoms.numbers for s in structures]).astype(np.int64)
            f["positions"] = np.concatenate([s.atoms.positions for s in structures]).astype(np.float64)
            f["forces"] = np.concatenate([np.asarray(s.forces, dtype=np.float64) for s in structures])
            f["cell"] = np.stack([s.atoms.cell.array for s in structures]).astype(np.float64)
            f["pbc"] = np.stack([s.atoms.pbc for s in structures]).astype(bool)
            f["energy"] = np.array([s.energy for s in structures], dtype=np.float64)
            f["stress"] = np.stack([_stress(s) for s in structures])
            f["force_sq"] = np.array([float(np.sum(np.asarray(s.forces) ** 2)) for s in structures])
            f["source_index"] = np.array([s.index for s in structures], dtype=np.int64)
    return {"file": path.name, "n_structures": len(structures), "n_atoms": int(sizes.sum())}


def write_dataset(structures, out_dir, shard_size: int = 10000, source: str = "") -> dict:
    """Write labelled structures (an iterable, consumed once) to shards in ``out_dir``; returns
    the header (without statistics; see :func:`blip.train.datasets.preprocess`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, chunk = [], []
    for s in structures:
        if s.energy is None or s.forces is None:
            raise DataError(s.source, "a training structure needs an energy and forces", s.index)
        chunk.append(s)
        if len(chunk) == shard_size:
            shards.append(_write_shard(out / f"shard-{len(shards):05d}.h5", len(shards), chunk))
            chunk = []
    if chunk:
        shards.append(_write_shard(out / f"shard-{len(shards):05d}.h5", len(shards), chunk))
    if not shards:
        raise DataError(source, "no structures to write")
    return {"format": FORMAT, "version": VERSION, "source": str(source), "shards": shards,
            "n_structures": sum(s["n_structures"] for s in shards)}


def write_header(out_dir, header: dict) -> None:
    from blip._files import write_text_atomic

    write_text_atomic(Path(out_dir) / HEADER, json.dumps(header, indent=1))


def is_dataset(path) -> bool:
    return path is not None and os.path.isdir(path)


class H5Store:
    """Read access to a data set folder; structures by global index (0 .. n-1, in file order)."""

    def __init__(self, path):
        self.path = Path(path)
        head = self.path / HEADER
        if not head.is_file():
            raise DataError(self.path, f"no {HEADER}: not a data set written by 'blip preprocess'")
        try:
            self.header = json.loads(head.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(head, "not valid JSON (truncated or foreign header)") from None
        if not isinstance(self.header, dict) or self.header.get("format") != FORMAT:
            raise DataError(head, f"not a BLIP HDF5 data set header (format {FORMAT!r} expected)")
        if self.header.get("version") != VERSION:
            raise DataError(head, f"data set version {self.header.get('version')!r}; this BLIP reads {VERSION}")
        self.shards = self.header["shards"]
        counts = np.array([s["n_structures"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._pid, self._files, self.offsets = None, {}, []
        for k in range(len(self.shards)):
            self.offsets.append(self._check(k))
        self.n_atoms = np.concatenate([np.diff(o) for o in self.offsets])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, k: int):
        import h5py

        if self._pid != os.getpid():  # a forked DataLoader worker opens its own handles
            self._pid, self._files = os.getpid(), {}
        if k not in self._files:
            path = self.path / self.shards[k]["file"]
            try:
                self._files[k] = h5py.File(path, "r")
            except FileNotFoundError:
                raise DataError(path, "shard listed in the header is missing") from None
            except OSError as exc:
                raise DataError(path, f"not a readable HDF5 shard (truncated or foreign file: "
                                      f"{str(exc).splitlines()[0][:100]})") from None
        return self._files[k]

    def _check(self, k: int) -> np.ndarray:
        f, meta = self._file(k), self.shards[k]
        where = self.path / meta["file"]
        if f.attrs.get("format") != SHARD_FORMAT:
            raise DataError(where, f"not a BLIP data shard (attribute format {SHARD_FORMAT!r} missing)")
        n, atoms = int(meta["n_structures"]), int(meta["n_atoms"])
        try:
            offsets = np.asarray(f["offsets"][:], dtype=np.int64)
            lengths = {"numbers": atoms, "positions": atoms, "forces": atoms, "cell": n, "pbc": n, "energy": n,
                       "force_sq": n}
            bad = [key for key, want in lengths.items() if key not in f or f[key].shape[0] != want]
        except (OSError, KeyError) as exc:
            raise DataError(where, f"unreadable shard (truncated?): {str(exc).splitlines()[0][:100]}") from None
        if bad or len(offsets) != n + 1 or offsets[-1] != atoms or int(f.attrs.get("n_structures", -1)) != n:
            raise DataError(where, f"shard does not match the header ({', '.join(bad) or 'counts'} "
                                   f"inconsistent: truncated or from another data set)")
        return offsets

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return k, int(i - self.starts[k])

    def structure(self, i: int) -> Structure:
        k, j = self.locate(i)
        f, o = self._file(k), self.offsets[k]
        a, b = int(o[j]), int(o[j + 1])
        try:
            pbc = np.asarray(f["pbc"][j], dtype=bool)
            atoms = ase.Atoms(numbers=f["numbers"][a:b], positions=f["positions"][a:b], cell=f["cell"][j], pbc=pbc)
            energy, forces = float(f["energy"][j]), np.asarray(f["forces"][a:b], dtype=np.float64)
            voigt = np.asarray(f["stress"][j], dtype=np.float64)
            stress = voigt_to_full(voigt) if np.all(np.isfinite(voigt)) else None
        except OSError as exc:
            raise DataError(self.path / self.shards[k]["file"], f"unreadable structure (truncated shard?): "
                                                                f"{str(exc).splitlines()[0][:100]}", j) from None
        return Structure(atoms=atoms, energy=energy, forces=forces, index=i, source=str(self.path), stress=stress)

    def per_structure(self, key: str) -> np.ndarray:
        """A per-structure dataset (energy, force_sq, ...) of every shard, concatenated."""
        return np.concatenate([np.asarray(self._file(k)[key][:]) for k in range(len(self.shards))])

    def composition(self, elements: list[int]) -> np.ndarray:
        """Element counts (structures, elements) float64, one shard at a time."""
        column = np.full(119, -1)
        column[elements] = np.arange(len(elements))
        rows = []
        for k in range(len(self.shards)):
            numbers, o = np.asarray(self._file(k)["numbers"][:]), self.offsets[k]
            owner = np.repeat(np.arange(len(o) - 1), np.diff(o))
            counts = np.zeros((len(o) - 1, len(elements)))
            np.add.at(counts, (owner, column[numbers]), 1.0)
            rows.append(counts)
        return np.concatenate(rows)

    def elements(self) -> list[int]:
        found = set()
        for k in range(len(self.shards)):
            found.update(np.unique(self._file(k)["numbers"][:]).tolist())
        return sorted(int(z) for z in found)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


class H5Structures:
    """A sequence of :class:`Structure` read on access from an :class:`H5Store` (``indices``: which)."""

    streaming = True

    def __init__(self, store: H5Store, indices=None):
        self.store = store
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.n_atoms = store.n_atoms[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        return self.store.structure(int(self.indices[int(k)]))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def subset(self, positions) -> "H5Structures":
        return H5Structures(self.store, self.indices[np.asarray(positions, dtype=np.int64)])

    def __add__(self, other):
        if isinstance(other, H5Structures) and other.store is self.store:
            return H5Structures(self.store, np.concatenate([self.indices, other.indices]))
        return list(self) + list(other)
