"""``blip active-learn CONFIG.yaml``: uncertainty-driven active learning with a random control.

Each round, for each strategy: train on the labelled set (or fine-tune the previous round's
model) -> test metrics -> score the remaining pool -> pick ``n_select`` -> label -> add.
Strategy "uncertainty" ranks the pool by a score of the predicted uncertainty with a
diversity rule; "random" picks uniformly with the same budget. Round 0 (the initial set) is
shared by all strategies.

The config file holds a normal ``blip train`` config (data/model/uq/training/output_dir;
``data.train_file`` is set by the loop) plus a section ``active_learning`` (see AL_DEFAULTS).
Paths in the file are relative to it; ``output_dir`` is relative to the working directory.

Output (OUT = output_dir):
    OUT/round_000/labelled.xyz              the initial labelled set (shared)
    OUT/<strategy>/round_NNN/labelled.xyz   labelled set of a round (written atomically)
    OUT/.../train/model.pt                  the round's model;  OUT/.../metrics.json its test rows
    OUT/learning_curve.csv, OUT/learning_curve.png
A killed run restarted with the same command resumes after its last completed round.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .errors import ConfigError

AL_DEFAULTS: dict = {
    "initial_file": None,  # starting structures (labelled unless the oracle is a calculator)
    "initial_size": 25,  # null = the whole file
    "initial_pick": "random",  # random | first
    "pool_file": None,  # candidate structures; those of initial_file are excluded if it is the same file
    "pool_size": None,  # cap on the pool (a random subset)
    "pool_md": None,  # mapping (POOL_MD_DEFAULTS): add MD frames of the round-0 model to the pool
    "oracle": "pool",  # pool (hidden labels of pool_file) | tblite (GFN2-xTB reference calculator)
    "tblite": {},  # settings of the tblite oracle (method, accuracy, electronic_temperature, ...)
    "rounds": 5,  # selection rounds after round 0
    "n_select": 25,  # structures labelled per round and strategy
    "strategies": ["uncertainty", "random"],
    "score": "max_force_std",  # SCORES
    "diversity": "greedy",  # greedy | fps | none
    "diversity_threshold": 0.1,  # greedy: skip within this fraction of the median descriptor distance
    "diversity_candidates": 4,  # greedy/fps: consider the top (this x n_select) scored structures
    "samples": 16,  # Monte-Carlo samples K for scoring and test metrics
    "fine_tune": False,  # start each round from the previous round's weights
    "seed": 0,
}
POOL_MD_DEFAULTS: dict = {"temperature": 600.0, "steps": 200, "every": 10, "timestep": 0.5,
                          "friction": 0.01, "starts": 4}
SCORES = {
    "max_force_std": "max over atoms of the per-atom force std norm, eV/A",
    "mean_force_std": "mean over atoms of the per-atom force std norm, eV/A",
    "energy_std_per_atom": "energy std / number of atoms, eV/atom",
}
STRATEGIES = ("uncertainty", "random")
CSV_FIELDS = ["strategy", "round", "n_labelled", "n_train", "test", "energy_rmse_meV",
              "energy_per_atom_rmse_meV", "forces_rmse_meV_A", "energy_nll", "forces_nll",
              "forces_spearman", "train_seconds"]


# -- configuration ----------------------------------------------------------------------
@dataclass
class ALConfig:
    """Resolved active-learning settings (``al``) and the training config of every round."""

    al: dict
    training: dict
    output_dir: Path


def load_config(path, overrides=()) -> ALConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return resolve_config(user, path.parent, overrides)


def resolve_config(user: dict, base_dir, overrides=()) -> ALConfig:
    """Validate the ``active_learning`` section (unknown keys are errors) and the training part."""
    from . import config as config_mod

    user = copy.deepcopy(user)
    for text in overrides:
        _deep_update(user, config_mod.parse_override(text))
    base_dir = Path(base_dir)
    if "active_learning" not in user or not isinstance(user["active_learning"], dict):
        raise ConfigError("config needs a mapping 'active_learning' (see examples/active/acac.yaml)")
    al = _merge_known(AL_DEFAULTS, user.pop("active_learning"), "active_learning.")
    if al["pool_md"] is not None:
        if not isinstance(al["pool_md"], dict):
            raise ConfigError("active_learning.pool_md must be a mapping (or null)")
        al["pool_md"] = _merge_known(POOL_MD_DEFAULTS, al["pool_md"], "active_learning.pool_md.")
    _check_al(al)
    for key in ("initial_file", "pool_file"):
        if al[key] is not None:
            al[key] = str((base_dir / al[key]).resolve())
    data = user.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError("config key 'data' must be a mapping")
    if data.get("train_file"):
        raise ConfigError("data.train_file is set by active learning each round; "
                          "give the starting structures as active_learning.initial_file")
    data["train_file"] = "labelled.xyz"  # placeholder, replaced every round
    user.setdefault("output_dir", "runs/active")
    training = config_mod.resolve(user, base_dir=base_dir)
    if not training["data"]["test_files"]:
        raise ConfigError("data.test_files must name at least one test set (learning curves are measured on it)")
    if "uncertainty" in al["strategies"] and training["uq"]["method"] == "deterministic":
        raise ConfigError("strategy 'uncertainty' needs a model with uncertainty (uq.method blip, "
                          "mc_dropout or ensemble), not 'deterministic'")
    if al["oracle"] == "tblite":
        from .oracle import tblite_oracle

        tblite_oracle(al["tblite"])  # validates the settings early
    return ALConfig(al=al, training=training, output_dir=Path(training["output_dir"]))


def _merge_known(defaults: dict, user, where: str) -> dict:
    if not isinstance(user, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a mapping")
    unknown = sorted(set(user) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; known keys: {', '.join(sorted(defaults))}")
    return {**copy.deepcopy(defaults), **user}


def _deep_update(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _check_al(al: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"active_learning.{msg}")

    need(al["initial_file"], "initial_file is required")
    need(al["oracle"] in ("pool", "tblite"), "oracle must be 'pool' or 'tblite'")
    if al["oracle"] == "pool":
        need(al["pool_file"], "pool_file is required with oracle 'pool'")
        need(al["pool_md"] is None, "pool_md needs a reference calculator (oracle 'tblite'), not 'pool'")
    else:
        need(al["pool_file"] or al["pool_md"], "give pool_file and/or pool_md")
    for key in ("rounds", "n_select", "samples", "diversity_candidates", "seed"):
        need(isinstance(al[key], int) and not isinstance(al[key], bool), f"{key} must be an integer")
    need(al["rounds"] >= 0, "rounds must be >= 0")
    need(al["n_select"] >= 1, "n_select must be >= 1")
    need(al["samples"] >= 1, "samples must be >= 1")
    need(al["diversity_candidates"] >= 1, "diversity_candidates must be >= 1")
    need(al["initial_size"] is None or (isinstance(al["initial_size"], int) and al["initial_size"] >= 2),
         "initial_size must be an integer >= 2 (or null for the whole file)")
    need(al["pool_size"] is None or (isinstance(al["pool_size"], int) and al["pool_size"] >= 1),
         "pool_size must be a positive integer or null")
    need(al["initial_pick"] in ("random", "first"), "initial_pick must be random or first")
    need(al["score"] in SCORES, f"score must be one of {', '.join(SCORES)}")
    need(al["diversity"] in ("greedy", "fps", "none"), "diversity must be greedy, fps or none")
    need(isinstance(al["diversity_threshold"], (int, float)) and al["diversity_threshold"] >= 0,
         "diversity_threshold must be a number >= 0")
    need(isinstance(al["strategies"], list) and al["strategies"]
         and set(al["strategies"]) <= set(STRATEGIES) and len(set(al["strategies"])) == len(al["strategies"]),
         f"strategies must be a list of distinct names from {', '.join(STRATEGIES)}")
    need(isinstance(al["fine_tune"], bool), "fine_tune must be true or false")
    need(isinstance(al["tblite"], dict), "tblite must be a mapping")
    md = al["pool_md"]
    if md is not None:
        need(md["steps"] >= 1 and md["every"] >= 1 and md["starts"] >= 1, "pool_md steps, every, starts must be >= 1")


# -- scoring and selection ---------------------------------------------------------------
def uncertainty_scores(pred: dict, score: str, n_atoms) -> np.ndarray:
    """Score (N,) per structure from a ``BlipModel.predict`` output; larger = less certain."""
    if score == "energy_std_per_atom":
        return np.asarray(pred["energy_std"], dtype=float) / np.asarray(n_atoms, dtype=float)
    norms = [np.linalg.norm(f, axis=1) for f in pred["forces_std"]]  # per-atom std vector norms, eV/A
    reduce = np.max if score == "max_force_std" else np.mean
    return np.array([float(reduce(n)) for n in norms])


def pair_distance_descriptor(atoms, elements: list[int], cutoff: float, bins: int = 24) -> np.ndarray:
    """Per-element-pair histogram of interatomic distances (Gaussian-smeared, per atom).

    A rotation-, translation- and permutation-invariant fingerprint of a structure's
    geometry, (n_pairs * bins,); distances up to ``cutoff`` (Angstrom) from vesin.
    """
    from .data import build_graph

    g = build_graph(atoms, cutoff)
    i, j = g["edge_index"]
    r = g["positions"][j] - g["positions"][i] + g["shifts"]
    d = np.linalg.norm(r, axis=1)
    slot = {z: k for k, z in enumerate(elements)}
    ne = len(elements)
    zi = np.array([slot[int(z)] for z in g["numbers"][i]], dtype=int)
    zj = np.array([slot[int(z)] for z in g["numbers"][j]], dtype=int)
    lo, hi = np.minimum(zi, zj), np.maximum(zi, zj)
    pair = lo * ne + hi
    grid = np.linspace(0.5, cutoff, bins)
    width = grid[1] - grid[0]
    weights = np.exp(-0.5 * ((d[:, None] - grid[None]) / width) ** 2) * 0.5 * (np.cos(np.pi * d / cutoff) + 1)[:, None]
    out = np.zeros((ne * ne, bins))
    np.add.at(out, pair, weights)
    return out.ravel() / max(len(atoms), 1)


def _pairwise(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0.0))


def rank_greedy(scores: np.ndarray, descriptors: np.ndarray, n_select: int, threshold: float) -> list[int]:
    """Ranking (positions into ``scores``): highest scores first, skipping near-duplicates.

    A candidate is deferred if its descriptor lies within ``threshold`` x the median
    pairwise descriptor distance of an already-picked one; deferred ones follow the picks.
    """
    order = list(np.argsort(-scores, kind="stable"))
    dist = _pairwise(descriptors)
    off = dist[np.triu_indices(len(dist), 1)]
    tau = threshold * float(np.median(off)) if off.size else 0.0
    picked, deferred = [], []
    for c in order:
        if len(picked) < n_select and all(dist[c, p] >= tau for p in picked):
            picked.append(c)
        else:
            deferred.append(c)
    return picked + deferred


def rank_fps(scores: np.ndarray, descriptors: np.ndarray) -> list[int]:
    """Farthest-point order starting from the highest score (ties broken by score)."""
    first = int(np.argmax(scores))
    dist = _pairwise(descriptors)
    chosen = [first]
    mind = dist[first].copy()
    mind[first] = -1.0
    while len(chosen) < len(scores):
        best = max((k for k in range(len(scores)) if mind[k] >= 0), key=lambda k: (mind[k], scores[k]))
        chosen.append(best)
        mind = np.minimum(mind, dist[best])
        mind[chosen] = -1.0
    return chosen


# -- the loop ----------------------------------------------------------------------------
class ActiveLearning:
    """Runs (or resumes) the rounds of one config. ``after_round(strategy, round, rows)`` is
    called when a round of a strategy is complete (its next labelled set is on disk)."""

    def __init__(self, cfg: ALConfig, progress: bool = True, after_round=None, log=None):
        self.cfg, self.al, self.progress = cfg, cfg.al, progress
        self.out = cfg.output_dir
        self.ek, self.fk = cfg.training["data"]["energy_key"], cfg.training["data"]["forces_key"]
        self.after_round = after_round
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.pool: list | None = None  # unlabelled Atoms; index = pool index
        self.oracle = None

    # paths
    def round_dir(self, strategy: str, r: int) -> Path:
        return self.out / "round_000" if r == 0 else self.out / strategy / f"round_{r:03d}"

    # -- entry point
    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_snapshot()
        self._file_pool = self._read_inputs()
        self.tests = self._test_sets()
        self._initial_set()
        rows = []
        for r in range(self.al["rounds"] + 1):
            for strategy in self.al["strategies"]:
                unit_rows = self._round(strategy, r)
                rows.extend(unit_rows)
                self._write_csv()
                if self.after_round is not None:
                    self.after_round(strategy, r, unit_rows)
            plot_learning_curves(self._all_rows(), self.out / "learning_curve.png")
        return self._all_rows()

    # -- inputs
    def _check_snapshot(self) -> None:
        """Refuse to resume a run made with a different config (``rounds`` may grow)."""
        snap = {"al": {k: v for k, v in self.al.items() if k != "rounds"}, "training": self.cfg.training}
        text = json.dumps(snap, sort_keys=True, indent=1, default=str)
        path = self.out / "active_config.json"
        if path.is_file():
            if path.read_text() != text:
                raise ConfigError(f"{self.out}: holds an active-learning run with a different config; "
                                  "use another output_dir (or delete the folder) to start afresh")
        else:
            _atomic_text(path, text)

    def _read_inputs(self) -> list:
        """Pick the initial set, build the file part of the pool (labels hidden), set the oracle."""
        from .data import read_labelled, read_structures
        from .oracle import PoolLabels, strip_labels, tblite_oracle

        al = self.al
        rng = np.random.default_rng(al["seed"])
        labelled = al["oracle"] == "pool"
        if labelled:
            initial_all = read_labelled(al["initial_file"], self.ek, self.fk)
        else:
            initial_all = [_Unlabelled(a, i) for i, a in enumerate(read_structures(al["initial_file"]))]
        n_init = len(initial_all) if al["initial_size"] is None else al["initial_size"]
        if n_init > len(initial_all):
            raise ConfigError(f"active_learning.initial_size {n_init} > {len(initial_all)} structures "
                              f"in {al['initial_file']}")
        chosen = (np.arange(n_init) if al["initial_pick"] == "first"
                  else np.sort(rng.permutation(len(initial_all))[:n_init]))
        self._initial = [initial_all[i] for i in chosen]
        file_pool, hidden = [], []
        if al["pool_file"]:
            same = Path(al["pool_file"]) == Path(al["initial_file"])
            pool_all = initial_all if same else (
                read_labelled(al["pool_file"], self.ek, self.fk) if labelled
                else [_Unlabelled(a, i) for i, a in enumerate(read_structures(al["pool_file"]))])
            keep = sorted(set(range(len(pool_all))) - (set(chosen.tolist()) if same else set()))
            if al["pool_size"] is not None and al["pool_size"] < len(keep):
                keep = sorted(np.random.default_rng(al["seed"] + 1).permutation(keep)[: al["pool_size"]].tolist())
            for i in keep:
                s = pool_all[i]
                a = strip_labels(s.atoms, self.ek, self.fk)
                a.info.update(al_origin="file", al_file_index=int(s.index))
                file_pool.append(a)
                hidden.append(s)
        self.oracle = PoolLabels(hidden) if labelled else tblite_oracle(al["tblite"])
        return file_pool

    def _test_sets(self) -> dict:
        from .data import read_labelled, read_structures
        from .oracle import write_labelled

        tests = {}
        for name, path in self.cfg.training["data"]["test_files"].items():
            if self.al["oracle"] == "pool":
                tests[name] = read_labelled(path, self.ek, self.fk)
                continue
            cache = self.out / f"test_{_safe(name)}.xyz"
            if not cache.is_file():
                self.log(f"active-learn: labelling test set {name} with {self.oracle.name}")
                structures = [self.oracle.label(a, i) for i, a in enumerate(read_structures(path))]
                ok = [s for s in structures if s is not None]
                if len(ok) < len(structures):
                    self.log(f"active-learn: {len(structures) - len(ok)} test structure(s) of {name} could not "
                             "be labelled and are left out")
                write_labelled(cache, ok, self.ek, self.fk)
            tests[name] = read_labelled(cache, self.ek, self.fk)
        return tests

    def _initial_set(self) -> None:
        from .oracle import strip_labels, write_labelled

        path = self.round_dir("", 0) / "labelled.xyz"
        if path.is_file():
            return
        labelled, info = [], []
        for s in self._initial:
            if self.al["oracle"] == "pool":
                item = _copy_structure(s, strip_labels(s.atoms, self.ek, self.fk))
            else:
                item = self.oracle.label(s.atoms, s.index)
            if item is not None:
                labelled.append(item)
                info.append({"al_pool_index": -1, "al_round": 0, "al_file_index": int(s.index)})
        if len(labelled) < 2:
            raise ConfigError("active learning needs at least 2 labelled initial structures")
        write_labelled(path, labelled, self.ek, self.fk, info)

    # -- one round of one strategy
    def _round(self, strategy: str, r: int) -> list[dict]:
        from .data import read_labelled
        from .io import load

        here = self.round_dir(strategy, r)
        labelled = read_labelled(here / "labelled.xyz", self.ek, self.fk)
        metrics_path = here / "metrics.json"
        if metrics_path.is_file():
            rows = json.loads(metrics_path.read_text())
            model = None
        else:
            init = self.round_dir(strategy, r - 1) / "train" / "model.pt" if (r and self.al["fine_tune"]) else None
            model, n_train, seconds = self._train(here, init)
            rows = self._evaluate(model, len(labelled), n_train, seconds, r)
            _atomic_text(metrics_path, json.dumps(rows, indent=1))
        rows = [{**row, "strategy": strategy} for row in rows]
        nxt = self.round_dir(strategy, r + 1) / "labelled.xyz"
        if r < self.al["rounds"] and not nxt.is_file():
            model = model or load(here / "train" / "model.pt")
            self._ensure_pool(model)
            self._select_and_label(strategy, r, model, labelled, nxt)
        for row in rows:
            self.log(f"round {r} {strategy:11s} n={row['n_labelled']:4d} {row['test']}: "
                     f"E {row['energy_rmse_meV']:.2f} meV, F {row['forces_rmse_meV_A']:.1f} meV/A, "
                     f"F NLL {_f(row['forces_nll'])}")
        return rows

    def _train(self, here: Path, init_model: Path | None):
        from .train.datasets import prepare_data
        from .train.loop import Trainer

        cfg = copy.deepcopy(self.cfg.training)
        cfg["data"]["train_file"] = str(here / "labelled.xyz")
        cfg["data"]["test_files"] = {}
        cfg["output_dir"] = str(here / "train")
        cfg["training"]["resume"] = False
        data = prepare_data(cfg)
        t0 = time.time()
        if init_model is not None:
            from .io import load

            states = [m.state_dict() for m in load(init_model).members]
            trainer = _warm_start_trainer(cfg, states, progress=self.progress)
        else:
            trainer = Trainer(cfg, progress=self.progress)
        model = trainer.run(data)
        return model, len(data.train), time.time() - t0

    def _evaluate(self, model, n_labelled: int, n_train: int, seconds: float, r: int) -> list[dict]:
        from .evaluate import evaluate_structures

        rows = []
        for name, structures in self.tests.items():
            m, _ = evaluate_structures(model, structures, samples=self.al["samples"], seed=self.al["seed"],
                                       source=name)
            rows.append({"round": r, "n_labelled": n_labelled, "n_train": n_train, "test": name,
                         "energy_rmse_meV": 1000 * m["energy"]["rmse"],
                         "energy_per_atom_rmse_meV": 1000 * m["energy_per_atom"]["rmse"],
                         "forces_rmse_meV_A": 1000 * m["forces"]["rmse"],
                         "energy_nll": m["energy"]["nll"], "forces_nll": m["forces"]["nll"],
                         "forces_spearman": m["forces"]["spearman"], "train_seconds": seconds})
        return rows

    # -- pool
    def _ensure_pool(self, model0) -> None:
        if self.pool is not None:
            return
        pool = list(self._file_pool)
        if self.al["pool_md"] is not None:
            pool += self._md_pool(model0)
        if not pool:
            raise ConfigError("active learning: the pool is empty")
        self.pool = pool

    def _md_pool(self, model0) -> list:
        """Frames of Langevin MD with the round-0 model (MAP forces) from initial structures."""
        from .data import read_labelled, read_structures
        from .md import MDFault, MDSettings, run_md
        from .oracle import write_extxyz_atomic

        path = self.out / "pool_md.xyz"
        if path.is_file():
            return read_structures(path)
        md = self.al["pool_md"]
        starts = read_labelled(self.round_dir("", 0) / "labelled.xyz", self.ek, self.fk)
        picks = np.unique(np.linspace(0, len(starts) - 1, min(md["starts"], len(starts))).round().astype(int))
        frames = []
        for k, i in enumerate(picks):
            settings = MDSettings(steps=md["steps"], temperature_K=md["temperature"], timestep_fs=md["timestep"],
                                  friction_per_fs=md["friction"], every=10**9, log_every=md["every"],
                                  seed=self.al["seed"] + k, samples=0)
            try:
                result = run_md(model0, starts[i].atoms, settings, keep_frames=True, source=f"pool MD start {k}")
            except MDFault as fault:
                self.log(f"active-learn: {fault}; keeping the frames before it")
                result = fault.result
            for f in result.frames:
                if f.info["step"] == 0:
                    continue
                a = f.copy()
                a.arrays.pop("momenta", None)
                a.info = {"al_origin": "md", "al_md_start": int(k), "al_md_step": int(f.info["step"])}
                frames.append(a)
        write_extxyz_atomic(path, frames)
        self.log(f"active-learn: pool MD at {md['temperature']} K gave {len(frames)} frames")
        return frames

    def _select_and_label(self, strategy, r, model, labelled, path) -> None:
        from .oracle import write_labelled

        taken = {int(s.atoms.info.get("al_pool_index", -1)) for s in labelled}
        remaining = [i for i in range(len(self.pool)) if i not in taken]
        if not remaining:
            self.log(f"active-learn: pool exhausted before round {r + 1} ({strategy})")
        ranking, scores, skipped = self._rank(strategy, r, model, remaining)
        new, info, chosen = [], [], []
        for idx in ranking:
            if len(new) == self.al["n_select"]:
                break
            item = self.oracle.label(self.pool[idx], idx)
            if item is not None:
                new.append(item)
                chosen.append(idx)
                info.append({"al_pool_index": int(idx), "al_round": r + 1,
                             **{k: v for k, v in self.pool[idx].info.items() if k.startswith("al_")}})
        if len(new) < self.al["n_select"]:
            self.log(f"active-learn: only {len(new)} of {self.al['n_select']} structures labelled in round {r + 1}")
        old_info = [{k: v for k, v in s.atoms.info.items() if k.startswith("al_")} for s in labelled]
        write_labelled(path, list(labelled) + new, self.ek, self.fk, old_info + info)
        selection = {"strategy": strategy, "score": self.al["score"] if scores else None,
                     "pool_indices": chosen, "scores": [float(scores[i]) for i in chosen] if scores else None,
                     "pool_score_mean": float(np.mean(list(scores.values()))) if scores else None,
                     "passed_over_for_diversity": skipped}
        _atomic_text(path.parent / "selection.json", json.dumps(selection, indent=1))

    def _rank(self, strategy, r, model, remaining):
        """Pool indices in the order they should be labelled, {pool index: score} and how many
        of the ``n_select`` best-scored structures the diversity rule passed over."""
        al = self.al
        if not remaining:
            return [], None, 0
        if strategy == "random":
            rng = np.random.default_rng([al["seed"], r, 1])
            return [remaining[k] for k in rng.permutation(len(remaining))], None, 0
        atoms = [self.pool[i] for i in remaining]
        pred = model.predict(atoms, samples=al["samples"], seed=al["seed"] + 1000 + r, progress=self.progress,
                             source="pool")
        scores = uncertainty_scores(pred, al["score"], [len(a) for a in atoms])
        order = np.argsort(-scores, kind="stable")
        by_index = {remaining[k]: scores[k] for k in range(len(remaining))}
        if al["diversity"] == "none":
            return [remaining[k] for k in order], by_index, 0
        top = order[: al["diversity_candidates"] * al["n_select"]]
        elements = sorted(model.summary.elements)
        desc = np.stack([pair_distance_descriptor(atoms[k], elements, model.cutoff) for k in top])
        if al["diversity"] == "greedy":
            local = rank_greedy(scores[top], desc, al["n_select"], float(al["diversity_threshold"]))
        else:
            local = rank_fps(scores[top], desc)
        ranked = [remaining[top[k]] for k in local] + [remaining[k] for k in order[len(top):]]
        n = al["n_select"]
        skipped = len({remaining[k] for k in order[:n]} - set(ranked[:n]))  # top scores passed over
        return ranked, by_index, skipped

    # -- outputs
    def _all_rows(self) -> list[dict]:
        rows = []
        for r in range(self.al["rounds"] + 1):
            for strategy in self.al["strategies"]:
                path = self.round_dir(strategy, r) / "metrics.json"
                if path.is_file():
                    rows += [{**row, "strategy": strategy} for row in json.loads(path.read_text())]
        return rows

    def _write_csv(self) -> None:
        rows = self._all_rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv(row.get(k)) for k in CSV_FIELDS})
        _atomic_text(self.out / "learning_curve.csv", buf.getvalue())


class _Unlabelled:
    """Stand-in for a Structure when labels come from a calculator oracle."""

    def __init__(self, atoms, index):
        self.atoms, self.index, self.energy, self.forces = atoms, index, None, None


def _copy_structure(s, atoms):
    from .data import Structure

    return Structure(atoms=atoms, energy=s.energy, forces=s.forces, index=s.index, source=s.source)


def _warm_start_trainer(cfg: dict, states: list[dict], progress: bool = True):
    """A Trainer whose members start from ``states`` (fine-tuning from the previous round)."""
    from .train.loop import Trainer

    class WarmStartTrainer(Trainer):
        def _new_member(self, data, member):
            model, opt, ema = super()._new_member(data, member)
            state = states[member % len(states)]
            model.load_state_dict(state)
            ema.module.load_state_dict(state)
            return model, opt, ema

    return WarmStartTrainer(cfg, progress=progress)


def plot_learning_curves(rows: list[dict], path) -> Path:
    """PNG: energy RMSE, force RMSE and force NLL vs labelled structures, one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tests = sorted({row["test"] for row in rows})
    panels = [("energy_rmse_meV", "energy RMSE (meV)"), ("forces_rmse_meV_A", "force RMSE (meV/Å)"),
              ("forces_nll", "force NLL (nats, eV/Å)")]
    fig = Figure(figsize=(4.2 * len(panels), 3.4 * max(1, len(tests))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(tests)), len(panels), squeeze=False)
    for t, test in enumerate(tests):
        for p, (key, label) in enumerate(panels):
            ax = axes[t][p]
            for strategy in sorted({row["strategy"] for row in rows}):
                pts = sorted((row["n_labelled"], row[key]) for row in rows
                             if row["test"] == test and row["strategy"] == strategy and row.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=strategy)
            ax.set_xlabel("labelled structures")
            ax.set_ylabel(label)
            ax.set_title(test, fontsize=9)
            if key != "forces_nll":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    return path


def format_rows(rows: list[dict]) -> str:
    """Markdown table of the learning curves."""
    head = "| strategy | round | n_labelled | test | E RMSE (meV) | F RMSE (meV/Å) | F NLL |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["test"], x["strategy"], x["round"])):
        lines.append(f"| {row['strategy']} | {row['round']} | {row['n_labelled']} | {row['test']} | "
                     f"{row['energy_rmse_meV']:.2f} | {row['forces_rmse_meV_A']:.1f} | {_f(row['forces_nll'])} |")
    return "\n".join(lines)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _csv(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _atomic_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- command line ----------------------------------------------------------------------
def cmd_active_learn(args) -> int:
    cfg = load_config(args.config, list(args.set or []))
    rows = ActiveLearning(cfg, progress=not args.quiet).run()
    print(format_rows(rows))
    print(f"\nwrote {cfg.output_dir / 'learning_curve.csv'} and {cfg.output_dir / 'learning_curve.png'}",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("active-learn", help="active learning: uncertainty-driven vs random selection")
    p.add_argument("config", help="YAML: a blip train config plus an 'active_learning' section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. active_learning.rounds=2 or training.epochs=5")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_active_learn)
