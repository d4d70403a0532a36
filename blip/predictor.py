"""BlipModel: what ``blip.load`` returns; Monte-Carlo prediction with uncertainties."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.base import DatasetSummary
from .data import build_graph, check_elements, collate, replicate
from .errors import DataError
from .model import BayesianPotential

MAX_EDGES_PER_PASS = 10_000  # replicas x (edges + atoms) per forward pass; larger passes get memory-bound


class BlipModel:
    """A trained potential (or ensemble) with its config, data summary and calibration.

    ``predict`` returns means, standard deviations (population, ddof=0) and samples.
    ``calibration`` holds one multiplicative factor per target applied to the spread.
    """

    def __init__(self, members: list[BayesianPotential], config: dict, summary: DatasetSummary,
                 calibration: dict | None = None, info: dict | None = None):
        self.members = members
        self.config = config
        self.summary = summary
        self.calibration = {"energy": 1.0, "forces": 1.0, **(calibration or {})}
        self.info = info or {}
        self.device = torch.device("cpu")
        for m in self.members:
            m.eval()

    @property
    def method(self) -> str:
        return self.config["uq"]["method"]

    @property
    def cutoff(self) -> float:
        return float(self.members[0].backbone.cutoff)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.members[0].parameters()).dtype

    @property
    def default_samples(self) -> int:
        return len(self.members) if self.method == "ensemble" else int(self.config["uq"]["samples"])

    def to(self, device) -> "BlipModel":
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)
        return self

    # -- core: one batch -------------------------------------------------------------
    def sample_batch(self, batch: dict, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (K, G) eV and forces (K, N, 3) eV/A for one collated batch.

        samples=0 gives the MAP pass only (K = 1). For an ensemble K is the number of
        members. Otherwise the batch is replicated K times and sampled in one pass.
        """
        if self.method == "ensemble":
            outs = [m(batch) for m in self.members]
            return (torch.stack([o["energy"].detach() for o in outs]),
                    torch.stack([o["forces"].detach() for o in outs]))
        model = self.members[0]
        if samples == 0 or not model.stochastic:
            out = model(batch)
            return out["energy"].detach()[None], out["forces"].detach()[None]
        g, n = batch["n_atoms"].shape[0], batch["positions"].shape[0]
        per_copy = int(batch["n_edges"].sum()) + n
        group = max(1, min(samples, MAX_EDGES_PER_PASS // max(per_copy, 1)))
        energies, forces = [], []
        shared = model.backbone.shared_terms(batch) or {}  # noise-free terms, once for all replicas
        for first in range(0, samples, group):  # large structures: replicas in groups
            k = min(group, samples - first)
            rep = replicate(batch, k)
            rep["replica"] = rep["replica"] + first
            rep.update(shared)
            out = model(rep, sample=True, seed=seed)
            energies.append(out["energy"].detach().reshape(k, g))
            forces.append(out["forces"].detach().reshape(k, n, 3))
        return torch.cat(energies), torch.cat(forces)

    # -- user API --------------------------------------------------------------------
    def predict(self, atoms_list, samples: int | None = None, seed: int | None = None,
                progress: bool = False, source: str = "input", indices=None) -> dict:
        """Predict energies and forces with uncertainties for a list of ``ase.Atoms``.

        Returns numpy arrays: ``energy``, ``energy_std`` (N,) eV; ``forces``, ``forces_std``
        lists of (n_i, 3) eV/A; ``energy_samples`` (K, N); ``forces_samples`` list of
        (K, n_i, 3). Standard deviations are population (ddof=0) over the K samples, times
        the calibration factor. ``energy`` and ``forces`` are the noise-free (MAP) pass when
        ``uq.predict_mean`` is "map" (the default), else the sample means; the ensemble always
        gives its member mean. ``samples=0`` is the noise-free MAP prediction (std zero; for
        an ensemble the member mean). An ensemble ignores other values of ``samples``: its K
        is the number of members. ``indices``: the structures' positions in a larger input (they
        key the noise, so a part predicted on its own gets the samples of the whole).
        """
        if hasattr(atoms_list, "get_positions"):
            atoms_list = [atoms_list]
        samples = self.default_samples if samples is None else int(samples)
        if samples < 0:
            raise ValueError("samples must be >= 0")
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        self.check_structures(atoms_list, source)
        indices = range(len(atoms_list)) if indices is None else [int(i) for i in indices]
        graphs = [build_graph(a, self.cutoff, index=i, source=source) for i, a in zip(indices, atoms_list)]
        k_eff = max(1, len(self.members) if self.method == "ensemble" else samples)
        map_mean = samples > 0 and self.predicts_map
        e_samples, f_samples = [None] * len(graphs), [None] * len(graphs)
        e_map, f_map = [None] * len(graphs), [None] * len(graphs)
        passes = [(samples, chunk) for chunk in _chunks(graphs, k_eff, MAX_EDGES_PER_PASS)]
        if map_mean:  # the noise-free pass in its own, larger chunks (one copy per structure)
            passes += [(0, chunk) for chunk in _chunks(graphs, 1, MAX_EDGES_PER_PASS)]
        for k, chunk in tqdm(passes, desc="predict", disable=not progress, unit="batch"):
            batch = collate([graphs[i] for i in chunk], dtype=self.dtype, device=self.device)
            e_out, f_out = (e_map, f_map) if k == 0 and map_mean else (e_samples, f_samples)
            _scatter(batch, chunk, *self.sample_batch(batch, k, seed), e_out, f_out)
        means = ([e[0] for e in e_map], [f[0] for f in f_map]) if map_mean else None
        return self._summarise(e_samples, f_samples, stochastic=samples > 0, means=means)

    @property
    def predicts_map(self) -> bool:
        """Whether the predicted energies and forces are the noise-free (MAP) pass, not the sample mean."""
        return self.method in ("blip", "mc_dropout") and self.config["uq"].get("predict_mean", "samples") == "map"

    def _summarise(self, e_samples, f_samples, stochastic: bool, means=None) -> dict:
        """Means, calibrated standard deviations and samples; ``means`` (energies, forces) replace the
        sample means as the prediction (the spread stays that of the samples)."""
        ce, cf = self.calibration["energy"], self.calibration["forces"]
        energy_samples = np.stack(e_samples, axis=1)  # (K, N)
        e_mean = energy_samples.mean(0)
        f_mean = [f.mean(0) for f in f_samples]
        if stochastic:
            energy_samples = e_mean + ce * (energy_samples - e_mean)
            f_samples = [m + cf * (f - m) for m, f in zip(f_mean, f_samples)]
            e_std = energy_samples.std(0)
            f_std = [f.std(0) for f in f_samples]
            if means is not None:
                e_mean, f_mean = np.asarray(means[0]), list(means[1])
        else:
            e_std = np.zeros_like(e_mean)
            f_std = [np.zeros_like(f) for f in f_mean]
            energy_samples = energy_samples[:0]
            f_samples = [f[:0] for f in f_samples]
        return {"energy": e_mean, "energy_std": e_std, "forces": f_mean, "forces_std": f_std,
                "energy_samples": energy_samples, "forces_samples": f_samples}

    def predict_distributed(self, atoms_list, **kwargs) -> dict | None:
        """:meth:`predict` with the structures split over the ranks of ``torch.distributed`` (r, r + W,
        ...); the results are gathered in input order on rank 0 (other ranks get None). One
        process: :meth:`predict`. Each structure's samples are those of a one-process run."""
        from . import distributed

        if not distributed.active():
            return self.predict(atoms_list, **kwargs)
        if hasattr(atoms_list, "get_positions"):
            atoms_list = [atoms_list]
        if kwargs.get("seed") is None:  # one seed for all ranks
            kwargs["seed"] = int(distributed.all_gather_objects(int(np.random.SeedSequence().entropy % (2**31)))[0])
        self.check_structures(atoms_list, kwargs.get("source", "input"))
        mine = list(range(distributed.rank(), len(atoms_list), distributed.world_size()))
        part = self.predict([atoms_list[i] for i in mine], indices=mine, **kwargs) if mine else None
        parts = distributed.all_gather_objects((mine, part))
        if not distributed.is_main():
            return None
        items: dict = {}
        for idx, p in parts:
            if p is None:
                continue
            for key, value in p.items():
                per = list(value) if isinstance(value, list) else list(np.moveaxis(np.asarray(value), -1, 0))
                slot = items.setdefault(key, {})
                slot.update(zip(idx, per))
        out = {}
        for key, slot in items.items():
            ordered = [slot[i] for i in range(len(atoms_list))]
            out[key] = ordered if isinstance(parts[0][1][key], list) else np.stack(ordered, axis=-1)
        return out

    def check_structures(self, atoms_list, source: str) -> None:
        """Raise DataError for an empty list, an element the model was not trained on, or NaN positions."""
        if len(atoms_list) == 0:
            raise DataError(source, "no structures to predict")
        check_elements(atoms_list, set(self.summary.elements), source)
        for i, atoms in enumerate(atoms_list):
            if not np.all(np.isfinite(atoms.get_positions())):
                raise DataError(source, "positions contain NaN or inf", i)


def _scatter(batch, chunk, energy, forces, e_out: list, f_out: list) -> None:
    """Split (K, G) energies and (K, N, 3) forces of a batch into per-structure numpy arrays."""
    energy, forces = energy.cpu().double().numpy(), forces.cpu().double().numpy()
    start = 0
    for pos, i in enumerate(chunk):
        n = int(batch["n_atoms"][pos])
        e_out[i] = energy[:, pos]
        f_out[i] = forces[:, start:start + n]
        start += n


def _chunks(graphs: list[dict], replicas: int, max_edges: int):
    """Group structure indices so that replicas * edges per pass stays under ``max_edges``."""
    chunk, cost = [], 0
    for i, g in enumerate(graphs):
        c = replicas * (int(g["n_edges"][0]) + int(g["n_atoms"][0]))
        if chunk and cost + c > max_edges:
            yield chunk
            chunk, cost = [], 0
        chunk.append(i)
        cost += c
    if chunk:
        yield chunk
