"""BlipModel: what ``blip.load`` returns; Monte-Carlo prediction with uncertainties."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.base import DatasetSummary
from .data import build_graph, check_elements, collate, replicate
from .data.io import full_to_voigt
from .errors import DataError
from .model import BayesianPotential
from .uq.metrics import structure_novelty
from .uq.mixture import LIMIT_KEYS, mix, network_limit, network_shares
from .uq.recalibration import NOVELTY_KEYS, floored_std, has_structure_floor, novelty_factor, widens

#: replicas x (edges + atoms) per forward pass. On a CPU larger passes get memory-bound; on a GPU small
#: passes are launch-bound (a kernel launch costs as much as thousands of rows of work), so one holds more
MAX_EDGES_PER_PASS = 10_000
MAX_EDGES_PER_PASS_GPU = 200_000
FORCE_STD = ("auto", "atom", "component")  # uq.force_std; auto: the one recalibration finds better


def atom_force_std(component_std: np.ndarray) -> np.ndarray:
    """Per-atom force std (n, 3) from per-component stds (n, 3): each row becomes the root mean
    square of its three entries, the spread of that atom's 3K force components about their means.
    The row norms (an atom's total spread, as the MD watch reads it) are unchanged."""
    pooled = np.sqrt(np.mean(np.square(component_std), axis=1, keepdims=True))
    return np.repeat(pooled, 3, axis=1)


class BlipModel:
    """A trained potential (or ensemble) with its config, data summary and calibration.

    ``predict`` returns predictions, standard deviations and samples; forces get
    one std per atom or per Cartesian component (``uq.force_std``; with "auto", the default,
    recalibration picks the one of lower NLL on its data and stores it in ``fitted_force_std``).
    ``calibration`` holds one multiplicative factor per target applied to the spread.
    """

    def __init__(self, members: list[BayesianPotential], config: dict, summary: DatasetSummary,
                 calibration: dict | None = None, info: dict | None = None, fitted_force_std: str | None = None):
        self.members = members
        self.config = config
        self.summary = summary
        self.calibration = {"energy": 1.0, "forces": 1.0, **(calibration or {})}
        self.info = info or {}
        self.fitted_force_std = fitted_force_std  # "atom" / "component" chosen by recalibration (force_std auto)
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

    @property
    def mixture(self) -> bool:
        """Whether this is a model of several sampled networks (``uq.networks``), predicted as the
        mixture of their own calibrated predictions (:mod:`blip.uq.mixture`)."""
        return self.method != "ensemble" and len(self.members) > 1

    def networks(self) -> list["BlipModel"]:
        """A model of each network of a mixture, with its own calibration (``calibration["networks"]``;
        uncalibrated before recalibration)."""
        calibrations = self.calibration.get("networks") or [{} for _ in self.members]
        nets = []
        for member, calibration in zip(self.members, calibrations):
            calibration = dict(calibration)
            force_std = calibration.pop("force_std", None)
            net = BlipModel([member], self.config, self.summary, calibration, self.info, force_std)
            net.device = self.device
            nets.append(net)
        return nets

    @property
    def folds_map_pass(self) -> bool:
        """Whether ``predict`` runs the noise-free pass as one more, noise-free replica in the sampled
        passes instead of a pass of its own: on a GPU, where passes of small structures are bound by
        kernel launches (about 0.6x fewer operators for K = 16, ``benchmarks/predict_kernels.py``);
        not on a CPU, where the extra replica with its rate heads cost more than the pass it replaces
        (8 acetylacetone molecules, K = 4: 7.3 against 6.4 MAP predicts)."""
        return self.device.type != "cpu"

    @property
    def max_edges_per_pass(self) -> int:
        """Replicas x (edges + atoms) of one forward pass on this model's device."""
        return MAX_EDGES_PER_PASS if self.device.type == "cpu" else MAX_EDGES_PER_PASS_GPU

    # -- core: one batch -------------------------------------------------------------
    def sample_batch(self, batch: dict, samples: int, seed: int, stress: bool = False,
                     noise_free_copy: bool = False, novelty: bool = False) -> dict[str, torch.Tensor]:
        """``energy`` (K, G) eV, ``forces`` (K, N, 3) eV/A (and ``stress`` (K, G, 3, 3) eV/A^3,
        NaN for open structures) of one collated batch.

        samples=0 gives the MAP pass only (K = 1). For an ensemble K is the number of
        members. Otherwise the batch is replicated K times and sampled in one pass;
        ``novelty``: BLIP models whose rate heads see features also return ``novelty`` (K, N), each
        atom's log feature distance in each sample (:meth:`BayesianPotential.forward`).
        ``noise_free_copy`` adds the noise-free (MAP) pass as one more replica in the same pass,
        the last entry (K + 1 in all): on a GPU, where small passes cost their kernel launches,
        that is nearly free (``predict`` does it there, see :attr:`folds_map_pass`).
        """
        keys = ("energy", "forces") + (("stress",) if stress else ())
        if self.method == "ensemble":
            outs = [m(batch, stress=stress) for m in self.members]
            return {key: torch.stack([o[key].detach() for o in outs]) for key in keys}
        model = self.members[0]
        if samples == 0 or not model.stochastic:
            out = model(batch, stress=stress)
            return {key: out[key].detach()[None] for key in keys}
        g, n = batch["n_atoms"].shape[0], batch["positions"].shape[0]
        per_copy = int(batch["n_edges"].sum()) + n
        copies = samples + int(noise_free_copy)
        group = max(1, min(copies, self.max_edges_per_pass // max(per_copy, 1)))
        novelty = novelty and model.wants_novelty
        parts = {key: [] for key in keys + (("novelty",) if novelty else ())}
        shared = model.backbone.shared_terms(batch) or {}  # noise-free terms, once for all replicas
        for first in range(0, copies, group):  # large structures: replicas in groups
            k = min(group, copies - first)
            rep = replicate(batch, k)
            rep["replica"] = rep["replica"] + first
            if noise_free_copy:
                rep["noise_free"] = rep["replica"] == samples
            rep.update(shared)
            out = model(rep, sample=True, seed=seed, stress=stress, novelty=novelty)
            parts["energy"].append(out["energy"].detach().reshape(k, g))
            if novelty:
                parts["novelty"].append(out["novelty"].detach().reshape(k, n))
            parts["forces"].append(out["forces"].detach().reshape(k, n, 3))
            if stress:
                parts["stress"].append(out["stress"].detach().reshape(k, g, 3, 3))
        return {key: torch.cat(value) for key, value in parts.items()}

    # -- user API --------------------------------------------------------------------
    def predict(self, atoms_list, samples: int | None = None, seed: int | None = None,
                progress: bool = False, source: str = "input", stress: bool | None = None, indices=None,
                map_pass: bool = True, map_values: dict | None = None, novelty: bool = False) -> dict:
        """Predict energies and forces (and stress) with uncertainties for a list of ``ase.Atoms``.

        Returns numpy arrays: ``energy``, ``energy_std`` (N,) eV; ``forces``, ``forces_std``
        lists of (n_i, 3) eV/A; ``energy_samples`` (K, N); ``forces_samples`` list of
        (K, n_i, 3). ``energy`` and ``forces`` are the noise-free (MAP) pass when
        ``uq.predict_mean`` is "map" (the default), else the sample means; the ensemble always
        gives its member mean. Standard deviations are the root mean square deviation of the K
        samples from that prediction (from the MAP pass: K degrees of freedom, and the samples'
        mean offset from the MAP counts as spread; from the sample mean: the population std,
        ddof=0), times the calibration factor, which also scales the returned samples about the
        prediction; where :attr:`force_std` is "atom" the three entries of an atom's
        ``forces_std`` row are equal, the root mean square of its components' stds (3K numbers per
        atom give a steadier spread than K per component; the row norm is the same either way).
        ``samples=0`` is the noise-free MAP prediction (std zero; for an ensemble the member mean).
        An ensemble ignores other values of ``samples``: its K is the number of members. A model of
        several sampled networks (``uq.networks``) predicts each network as a model of its own, with
        its own calibration, K split evenly over them (:func:`blip.uq.mixture.network_shares`), and
        returns their mixture (:func:`blip.uq.mixture.mix`: the mixture's factor only within the
        networks' validation feature distances; ``map_values`` are not used there).
        For BLIP models whose rate heads see features, where the calibration holds a
        ``forces_novelty`` b > 0 (set by recalibration with ``uq.novelty_widening``), each atom's
        force spread and samples are widened by ``exp(b (nu - novelty_centre))`` on top of the
        calibration factor, ``nu`` the atom's log squared feature distance from the training data
        (mean over the noisy node layers and the K samples); with an ``energy_novelty`` b_E > 0
        (``uq.energy_novelty_widening``) each structure's energy spread and samples by
        ``exp(b_E (max_atoms nu - energy_novelty_centre))``; beyond the largest distance of the
        validation split (``novelty_limit``, ``energy_novelty_limit``) both grow further by
        ``exp(b2 (nu - limit))`` (``uq.novelty_beyond``, ``uq.energy_novelty_beyond``).
        ``novelty=True`` also returns these
        ``atom_novelty`` (list of (n_i,); other models and ``samples=0``: no such key).
        A calibration with a ``forces_floor`` f (eV/A; ``uq.force_std_floor``) adds it to
        ``forces_std`` in quadrature, ``sqrt(std^2 + f^2)``, and one with a ``stress_floor``
        (eV/A^3; ``uq.stress_std_floor``, when recalibrated on stress labels) to ``stress_std``;
        one with a ``forces_structure_floor`` c (``uq.structure_floor``) also adds each
        structure's floor ``c exp(b (min(m, limit) - centre))``, m the mean of its atoms' nu
        (:func:`blip.uq.recalibration.structure_floor`); the samples are not changed by them.

        stress: also ``stress``, ``stress_std`` (N, 6) eV/A^3 in Voigt order (xx, yy, zz, yz,
        xz, xy; ASE's sign convention: the derivative of the energy with respect to strain over
        the volume) and ``stress_samples`` (K, N, 6); rows of open (non-periodic) structures
        are NaN. None (default): when any structure is periodic.
        ``indices``: the structures' positions in a larger input (they key the noise, so a part
        predicted on its own gets the samples of the whole). The stress spread takes its own
        calibration factor when the model was recalibrated on stress labels, else the forces' one.
        ``map_pass=False`` skips the noise-free pass: ``energy`` and ``forces`` are then the sample
        means and the spreads are about them. ``map_values``: the noise-free ``energy`` (N,) and
        ``forces`` (list of (n_i, 3)) the caller already has for these structures (an MD step's):
        the noise-free pass is skipped and the prediction and its spreads are those of a full
        ``predict`` (the stress spread, if asked for, is then about the sample mean).
        """
        if hasattr(atoms_list, "get_positions"):
            atoms_list = [atoms_list]
        samples = self.default_samples if samples is None else int(samples)
        if samples < 0:
            raise ValueError("samples must be >= 0")
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        self.check_structures(atoms_list, source)
        if stress is None:
            stress = any(bool(np.any(a.pbc)) for a in atoms_list)
        if self.mixture:  # each network on its own (seed + m), then mixed; their own noise-free passes
            shares = network_shares(samples, len(self.members)) if samples > 0 else [0] * len(self.members)
            limited = samples > 0 and any(network_limit(self.calibration, t) is not None for t in LIMIT_KEYS)
            outs = [net.predict(atoms_list, samples=k, seed=seed + m, progress=progress, source=source,
                                stress=stress, indices=indices, map_pass=map_pass, novelty=novelty or limited)
                    for m, (net, k) in enumerate(zip(self.networks(), shares))]
            out = mix(outs, self.calibration, stochastic=samples > 0)  # the distances place its factor
            if not novelty:
                out.pop("atom_novelty", None)
            return out
        indices = range(len(atoms_list)) if indices is None else [int(i) for i in indices]
        graphs = [build_graph(a, self.cutoff, index=i, source=source) for i, a in zip(indices, atoms_list)]
        k_eff = max(1, len(self.members) if self.method == "ensemble" else samples)
        given = _given_map_values(map_values, len(atoms_list)) if samples > 0 and self.predicts_map else None
        map_mean = samples > 0 and self.predicts_map and map_pass and given is None
        keys = ("energy", "forces") + (("stress",) if stress else ())
        sampled = {key: [None] * len(graphs) for key in keys + ("novelty",)}
        noise_free = {key: [None] * len(graphs) for key in keys}
        fold = map_mean and self.folds_map_pass  # the noise-free pass as one more replica of the samples'
        record = novelty or any(widens(self.calibration, target) for target in NOVELTY_KEYS) \
            or has_structure_floor(self.calibration)  # only when used
        passes = [(samples, chunk) for chunk in _chunks(graphs, k_eff + int(fold), self.max_edges_per_pass)]
        if map_mean and not fold:  # the noise-free pass in its own, larger chunks (one copy per structure)
            passes += [(0, chunk) for chunk in _chunks(graphs, 1, self.max_edges_per_pass)]
        for k, chunk in tqdm(passes, desc="predict", disable=not progress, unit="batch"):
            batch = collate([graphs[i] for i in chunk], dtype=self.dtype, device=self.device)
            out = self.sample_batch(batch, k, seed, stress, noise_free_copy=fold, novelty=record)
            if fold:
                _scatter(batch, chunk, {key: v[k:] for key, v in out.items()}, noise_free)
                out = {key: v[:k] for key, v in out.items()}
            _scatter(batch, chunk, out, noise_free if k == 0 and map_mean else sampled)
        means = {key: [v[0] for v in values] for key, values in noise_free.items()} if map_mean else given
        return self._summarise(sampled, stochastic=samples > 0, means=means, novelty=novelty)

    @property
    def predicts_map(self) -> bool:
        """Whether the predicted energies and forces are the noise-free (MAP) pass, not the sample mean."""
        return self.method in ("blip", "mc_dropout") and self.config["uq"].get("predict_mean", "samples") == "map"

    @property
    def force_std(self) -> str:
        """The force spread ``predict`` gives, "atom" or "component": ``uq.force_std``, or with
        "auto" the one recalibration chose ("component" before it; model files written before
        the key: "component", the spread their calibration factor was fitted to)."""
        setting = self.config["uq"].get("force_std", "component")
        if setting == "auto":
            return self.fitted_force_std or "component"
        return setting

    def _summarise(self, sampled: dict, stochastic: bool, means: dict | None = None, novelty: bool = False) -> dict:
        """Predictions, calibrated standard deviations and samples from ``sampled`` (key -> one
        (K, ...) array per structure); ``means`` (key -> one array per structure, e.g. the MAP
        pass) replace the sample means as the prediction and as the centre of the spread."""
        factors = {"energy": self.calibration["energy"], "forces": self.calibration["forces"],
                   "stress": self.calibration.get("stress", self.calibration["forces"])}
        distances = sampled.pop("novelty", None)
        out = {}
        widen = {}  # key -> one factor per structure on its samples' deviations: (1, n, 1) per atom, or a number
        mean_novelty = None  # each structure's mean distance, where recorded
        if stochastic and distances is not None and all(v is not None for v in distances):
            atom_novelty = [v.mean(axis=0) for v in distances]
            mean_novelty = [float(np.mean(v)) for v in atom_novelty]
            force_factors = novelty_widening(atom_novelty, self.calibration)
            if force_factors is not None:
                widen["forces"] = [w[None, :, None] for w in force_factors]
            energy_factors = novelty_factor(structure_novelty(atom_novelty), self.calibration, "energy")
            if not np.isscalar(energy_factors):
                widen["energy"] = list(energy_factors)
            if novelty:
                out["atom_novelty"] = atom_novelty
        for key, per_structure in sampled.items():
            mean = [s.mean(0) for s in per_structure]
            if stochastic:
                if means is not None and key in means:
                    mean = list(means[key])
                widening = widen.get(key, [1.0] * len(per_structure))
                samples = [m + factors[key] * w * (s - m) for m, s, w in zip(mean, per_structure, widening)]
                # in float64: float32 samples of a runaway far out (|deviation| > 1e19) would square to inf
                std = [np.sqrt(np.mean(np.square(np.asarray(s, np.float64) - m), axis=0)) for m, s in zip(mean, samples)]
                if key == "forces" and self.force_std == "atom":
                    std = [atom_force_std(s) for s in std]
                means_nu = mean_novelty if key == "forces" and mean_novelty is not None else [None] * len(std)
                std = [floored_std(s, self.calibration, key, m) for s, m in zip(std, means_nu)]  # their floors
            else:
                samples = [s[:0] for s in per_structure]
                std = [np.zeros_like(m) for m in mean]
            if key == "forces":
                out.update(forces=mean, forces_std=std, forces_samples=samples)
            else:  # one value (energy) or one Voigt 6-vector (stress) per structure
                out.update({key: np.stack(mean), f"{key}_std": np.stack(std),
                            f"{key}_samples": np.stack(samples, axis=1)})
        return out

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
        if kwargs.get("stress") is None:  # the same keys on every rank
            kwargs["stress"] = any(bool(np.any(a.pbc)) for a in atoms_list)
        self.check_structures(atoms_list, kwargs.get("source", "input"))
        mine = list(range(distributed.rank(), len(atoms_list), distributed.world_size()))
        given = _given_map_values(kwargs.pop("map_values", None), len(atoms_list))
        if given is not None:  # each rank gets the noise-free values of its own structures
            kwargs["map_values"] = {key: [values[i] for i in mine] for key, values in given.items()}
        part = self.predict([atoms_list[i] for i in mine], indices=mine, **kwargs) if mine else None
        parts = distributed.all_gather_objects((mine, part))
        if not distributed.is_main():
            return None
        template = next(p for _, p in parts if p is not None)
        out = {}
        for key, value in template.items():
            axis = 1 if key.endswith("_samples") else 0  # (N, ...) or (K, N, ...); forces: lists
            slot = {}
            for idx, p in parts:
                if p is not None:
                    per = list(p[key]) if isinstance(value, list) else list(np.moveaxis(p[key], axis, 0))
                    slot.update(zip(idx, per))
            ordered = [slot[i] for i in range(len(atoms_list))]
            out[key] = ordered if isinstance(value, list) else np.stack(ordered, axis=axis)
        return out

    def check_structures(self, atoms_list, source: str) -> None:
        """Raise DataError for an empty list, an element the model was not trained on, or NaN positions."""
        if len(atoms_list) == 0:
            raise DataError(source, "no structures to predict")
        check_elements(atoms_list, set(self.summary.elements), source)
        for i, atoms in enumerate(atoms_list):
            if not np.all(np.isfinite(atoms.get_positions())):
                raise DataError(source, "positions contain NaN or inf", i)


def _given_map_values(values: dict | None, n: int) -> dict | None:
    """``predict``'s ``map_values`` checked: {"energy": [(), ...], "forces": [(n_i, 3), ...]} of ``n`` structures."""
    if values is None:
        return None
    if set(values) != {"energy", "forces"} or len(values["energy"]) != n or len(values["forces"]) != n:
        raise ValueError(f"map_values needs 'energy' and 'forces' of each of the {n} structures")
    return {"energy": [np.float64(e) for e in values["energy"]],
            "forces": [np.asarray(f, dtype=np.float64) for f in values["forces"]]}


def novelty_widening(atom_novelty: list, calibration: dict) -> list | None:
    """Per-atom factors ``exp(b (nu - nu_0) + b2 max(0, nu - limit))`` (one (n,) array per structure)
    of the force spread from each atom's log feature distance ``nu`` and the calibration's widening
    (set by :func:`blip.uq.recalibration.recalibrate`, :func:`~blip.uq.recalibration.novelty_factor`);
    None where it does not widen forces."""
    if not widens(calibration, "forces"):
        return None
    return [novelty_factor(nu, calibration) for nu in atom_novelty]


def _scatter(batch, chunk, values: dict, out: dict) -> None:
    """Split a batch's (K, G) energies, (K, N, 3) forces, (K, G, 3, 3) stresses and (K, N) novelty
    into per-structure numpy arrays in ``out[key][structure]`` (stress as Voigt (K, 6); novelty
    only where ``out`` has the key)."""
    values = {key: v.cpu().double().numpy() for key, v in values.items()}
    start = 0
    for pos, i in enumerate(chunk):
        n = int(batch["n_atoms"][pos])
        out["energy"][i] = values["energy"][:, pos]
        out["forces"][i] = values["forces"][:, start:start + n]
        if "novelty" in values and "novelty" in out:
            out["novelty"][i] = values["novelty"][:, start:start + n]
        if "stress" in values:
            out["stress"][i] = full_to_voigt(values["stress"][:, pos])
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
