"""The active-learning rounds: initial set, training, test metrics, selection and labelling."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from .._files import write_text_atomic
from ..errors import ConfigError
from .config import ALConfig
from .output import _f, plot_learning_curves, write_learning_curve_csv
from .selection import (duplicate_radius, farthest_from, model_features, pair_distance_descriptor, rank_fps,
                        rank_greedy, rank_weighted, uncertainty_scores)


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

    def pool_path(self, strategy: str, r: int) -> Path:
        """JSON of a round's pool scan: largest force sigma, pool size, whether the run stopped."""
        return self.out / strategy / f"pool_{r:03d}.json"

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
                if self._stopped_before(strategy, r):
                    continue
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
            write_text_atomic(path, text)

    def _read_inputs(self) -> list:
        """Pick the initial set, build the file part of the pool (labels hidden), set the oracle."""
        from ..data import read_labelled, read_structures
        from ..oracle import PoolLabels, strip_labels, tblite_oracle

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
        from ..data import read_labelled, read_structures
        from ..oracle import write_labelled

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
        from ..oracle import strip_labels, write_labelled

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
    def _stopped_before(self, strategy: str, r: int) -> bool:
        """True if the stopping rule ended ``strategy`` in a round before ``r``."""
        for k in range(r):
            path = self.pool_path(strategy, k)
            if path.is_file() and json.loads(path.read_text()).get("stopped"):
                return True
        return False

    def _round(self, strategy: str, r: int) -> list[dict]:
        from ..data import read_labelled
        from ..io import load

        here = self.round_dir(strategy, r)
        labelled = read_labelled(here / "labelled.xyz", self.ek, self.fk)
        metrics_path = here / "metrics.json"
        model = selector = None
        if metrics_path.is_file():
            rows = json.loads(metrics_path.read_text())
        else:
            model, n_train, seconds = self._train(here, self._init_of(strategy, r, "train"))
            rows = self._evaluate(model, len(labelled), n_train, seconds, r)
            if strategy == "ensemble" and r < self.al["rounds"]:
                selector, _, sel_seconds = self._train(here, self._init_of(strategy, r, "selector"), selector=True)
                for row in rows:
                    row["selector_seconds"] = sel_seconds
            write_text_atomic(metrics_path, json.dumps(rows, indent=1))
        nxt = self.round_dir(strategy, r + 1) / "labelled.xyz"
        pool_path = self.pool_path(strategy, r)
        if not pool_path.is_file() or (r < self.al["rounds"] and not nxt.is_file()
                                       and not json.loads(pool_path.read_text()).get("stopped")):
            model = model or load(here / "train" / "model.pt")
            if strategy == "ensemble" and r < self.al["rounds"]:
                selector = selector or self._selector(strategy, r)
            self._ensure_pool(model)
            self._select_and_label(strategy, r, model, selector or model, labelled, nxt)
        rows = [{**row, **self._pool_info(strategy, r), "strategy": strategy} for row in rows]
        for row in rows:
            self.log(f"round {r} {strategy:11s} n={row['n_labelled']:4d} {row['test']}: "
                     f"E {row['energy_rmse_meV']:.2f} meV, F {row['forces_rmse_meV_A']:.1f} meV/A, "
                     f"F NLL {_f(row['forces_nll'])}, pool max F sigma {_f(row.get('pool_max_force_std'))} eV/A"
                     + (" -> stop" if row.get("stopped") else ""))
        return rows

    def _init_of(self, strategy: str, r: int, which: str) -> Path | None:
        """The previous round's model to fine-tune (warm start), else None (from scratch)."""
        if not (r and self.al["warm_start"]):
            return None
        path = self.round_dir(strategy, r - 1) / which / "model.pt"
        return path if path.is_file() else None

    def _selector(self, strategy: str, r: int):
        """The ensemble selector of a round (trained if its model file is missing)."""
        from ..io import load

        here = self.round_dir(strategy, r)
        path = here / "selector" / "model.pt"
        if path.is_file():
            return load(path)
        return self._train(here, self._init_of(strategy, r, "selector"), selector=True)[0]

    def _pool_info(self, strategy: str, r: int) -> dict:
        path = self.pool_path(strategy, r)
        info = json.loads(path.read_text()) if path.is_file() else {}
        return {"pool_max_force_std": info.get("pool_max_force_std"), "pool_size": info.get("pool_size"),
                "stopped": bool(info.get("stopped", False))}

    def _train(self, here: Path, init_model: Path | None, selector: bool = False):
        from ..train.datasets import prepare_data
        from ..train.loop import Trainer

        cfg = copy.deepcopy(self.cfg.training)
        cfg["data"]["train_file"] = str(here / "labelled.xyz")
        cfg["data"]["test_files"] = {}
        cfg["output_dir"] = str(here / ("selector" if selector else "train"))
        cfg["training"]["resume"] = False
        if selector:
            cfg["uq"]["method"] = "ensemble"
            cfg["uq"]["ensemble_size"] = int(self.al["ensemble_size"])
        data = prepare_data(cfg)
        t0 = time.time()
        if init_model is not None:
            from ..io import load

            if self.al["warm_start_epochs"] is not None:
                cfg["training"]["epochs"] = int(self.al["warm_start_epochs"])
                cfg["training"]["patience"] = max(int(cfg["training"]["patience"]), cfg["training"]["epochs"] + 1)
            states = [m.state_dict() for m in load(init_model).members]
            trainer = _warm_start_trainer(cfg, states, progress=self.progress)
        else:
            trainer = Trainer(cfg, progress=self.progress)
        model = trainer.run(data)
        return model, len(data.train), time.time() - t0

    def _evaluate(self, model, n_labelled: int, n_train: int, seconds: float, r: int) -> list[dict]:
        from ..evaluate import evaluate_structures

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
        from ..data import read_labelled, read_structures
        from ..md import MDFault, MDSettings, run_md
        from ..oracle import write_extxyz_atomic

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

    def _select_and_label(self, strategy, r, model, selector, labelled, path) -> None:
        """Score the remaining pool, apply the stopping rule, pick and label ``n_select``.

        Writes ``pool.json`` of this round (largest calibrated force sigma of the pool and
        whether the stopping rule fired) and, unless it fired or this is the last round,
        the next round's labelled set and ``selection.json``.
        """
        from ..oracle import write_labelled

        al = self.al
        taken = {int(s.atoms.info.get("al_pool_index", -1)) for s in labelled}
        remaining = [i for i in range(len(self.pool)) if i not in taken]
        scores = None
        if remaining and selector.method != "deterministic":
            atoms = [self.pool[i] for i in remaining]
            pred = selector.predict(atoms, samples=al["samples"], seed=al["seed"] + 1000 + r,
                                    progress=self.progress, source="pool")
            scores = uncertainty_scores(pred, al["score"], [len(a) for a in atoms])
            pool_max = float(np.max(uncertainty_scores(pred, "max_force_std", [len(a) for a in atoms])))
        else:
            pool_max = None
        last = r >= al["rounds"]
        stop = (not last and al["stop_max_force_std"] is not None and pool_max is not None
                and pool_max < float(al["stop_max_force_std"]))
        if not remaining and not last:
            self.log(f"active-learn: pool exhausted before round {r + 1} ({strategy})")
        if stop:
            self.log(f"active-learn: {strategy}: the pool's largest force sigma {pool_max:.4f} eV/A < "
                     f"stop_max_force_std {al['stop_max_force_std']:g}; no more rounds")
        if last or stop:
            write_text_atomic(self.pool_path(strategy, r), json.dumps(
                {"pool_max_force_std": pool_max, "pool_size": len(remaining), "stopped": stop}, indent=1))
            return
        ranking, skipped, radius = self._rank(strategy, r, model, selector, remaining, scores, labelled)
        new, info, chosen = [], [], []
        for idx in ranking:
            if len(new) == al["n_select"]:
                break
            item = self.oracle.label(self.pool[idx], idx)
            if item is not None:
                new.append(item)
                chosen.append(idx)
                info.append({"al_pool_index": int(idx), "al_round": r + 1,
                             **{k: v for k, v in self.pool[idx].info.items() if k.startswith("al_")}})
        if len(new) < al["n_select"]:
            self.log(f"active-learn: only {len(new)} of {al['n_select']} structures labelled in round {r + 1}")
        by_index = None if scores is None else {remaining[k]: float(scores[k]) for k in range(len(remaining))}
        selection = {"strategy": strategy, "score": al["score"] if by_index else None,
                     "pool_indices": chosen,
                     "scores": [by_index[i] for i in chosen] if by_index else None,
                     "pool_score_mean": float(np.mean(scores)) if scores is not None else None,
                     "pool_max_force_std": pool_max, "diversity_radius": radius,
                     "passed_over_for_diversity": skipped}
        # the pool file last: a kill before it redoes the selection (same seed -> same picks)
        old_info = [{k: v for k, v in s.atoms.info.items() if k.startswith("al_")} for s in labelled]
        write_labelled(path, list(labelled) + new, self.ek, self.fk, old_info + info)
        write_text_atomic(path.parent / "selection.json", json.dumps(selection, indent=1))
        write_text_atomic(self.pool_path(strategy, r), json.dumps(
            {"pool_max_force_std": pool_max, "pool_size": len(remaining), "stopped": False}, indent=1))

    def _descriptors(self, model, atoms) -> np.ndarray:
        if self.al["diversity_space"] == "features":
            return model_features(model, atoms)
        elements = sorted(set(model.summary.elements) | {int(z) for a in atoms for z in a.numbers})
        return np.stack([pair_distance_descriptor(a, elements, model.cutoff) for a in atoms])

    def _rank(self, strategy, r, model, selector, remaining, scores, labelled):
        """Pool indices in labelling order, how many of the ``n_select`` best-scored structures
        the diversity rule passed over, and the near-duplicate radius it used."""
        al = self.al
        n = al["n_select"]
        if not remaining:
            return [], 0, None
        if strategy == "random":
            rng = np.random.default_rng([al["seed"], r, 1])
            return [remaining[k] for k in rng.permutation(len(remaining))], 0, None
        atoms = [self.pool[i] for i in remaining]
        if strategy == "fps":  # farthest-point sampling in the round's model's feature space
            ref = self._descriptors(model, [s.atoms for s in labelled])
            local = farthest_from(ref, self._descriptors(model, atoms), len(atoms))
            return [remaining[k] for k in local], 0, None
        if scores is None:
            raise ConfigError(f"strategy {strategy!r} needs a model with uncertainty")
        order = np.argsort(-scores, kind="stable")
        if al["diversity"] == "none":
            return [remaining[k] for k in order], 0, None
        top = order[: al["diversity_candidates"] * n]
        desc = self._descriptors(selector, [atoms[k] for k in top])
        radius = None
        if al["diversity"] == "greedy":
            ref = self._descriptors(selector, [s.atoms for s in labelled])
            radius = duplicate_radius(ref, float(al["diversity_threshold"]))
            local = rank_greedy(scores[top], desc, n, radius)
        elif al["diversity"] == "weighted":
            local = rank_weighted(scores[top], desc, self._descriptors(selector, [s.atoms for s in labelled]), n)
        else:
            local = rank_fps(scores[top], desc)
        ranked = [remaining[top[k]] for k in local] + [remaining[k] for k in order[len(top):]]
        skipped = len({remaining[k] for k in order[:n]} - set(ranked[:n]))  # top scores passed over
        return ranked, skipped, radius

    # -- outputs
    def _all_rows(self) -> list[dict]:
        rows = []
        for r in range(self.al["rounds"] + 1):
            for strategy in self.al["strategies"]:
                path = self.round_dir(strategy, r) / "metrics.json"
                if path.is_file():
                    rows += [{**row, **self._pool_info(strategy, r), "strategy": strategy}
                             for row in json.loads(path.read_text())]
        return rows

    def _write_csv(self) -> None:
        write_learning_curve_csv(self._all_rows(), self.out / "learning_curve.csv")


class _Unlabelled:
    """Stand-in for a Structure when labels come from a calculator oracle."""

    def __init__(self, atoms, index):
        self.atoms, self.index, self.energy, self.forces = atoms, index, None, None


def _copy_structure(s, atoms):
    from ..data import Structure

    return Structure(atoms=atoms, energy=s.energy, forces=s.forces, index=s.index, source=s.source)


def _warm_start_trainer(cfg: dict, states: list[dict], progress: bool = True):
    """A Trainer whose members start from ``states`` (fine-tuning from the previous round)."""
    from ..train.loop import Trainer

    class WarmStartTrainer(Trainer):
        def _new_member(self, data, member):
            model, opt, ema = super()._new_member(data, member)
            state = states[member % len(states)]
            model.load_state_dict(state)
            ema.module.load_state_dict(state)
            return model, opt, ema

    return WarmStartTrainer(cfg, progress=progress)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
