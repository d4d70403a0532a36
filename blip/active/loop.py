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
from .selection import pair_distance_descriptor, rank_fps, rank_greedy, uncertainty_scores


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
    def _round(self, strategy: str, r: int) -> list[dict]:
        from ..data import read_labelled
        from ..io import load

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
            write_text_atomic(metrics_path, json.dumps(rows, indent=1))
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
        from ..train.datasets import prepare_data
        from ..train.loop import Trainer

        cfg = copy.deepcopy(self.cfg.training)
        cfg["data"]["train_file"] = str(here / "labelled.xyz")
        cfg["data"]["test_files"] = {}
        cfg["output_dir"] = str(here / "train")
        cfg["training"]["resume"] = False
        data = prepare_data(cfg)
        t0 = time.time()
        if init_model is not None:
            from ..io import load

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

    def _select_and_label(self, strategy, r, model, labelled, path) -> None:
        from ..oracle import write_labelled

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
        write_text_atomic(path.parent / "selection.json", json.dumps(selection, indent=1))

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
