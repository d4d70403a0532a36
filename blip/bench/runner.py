"""Run one experiment: train every method, recalibrate on validation, score and time the test sets.

Every method of an experiment sees the same training/validation split, the same seed and
the same budget. Recalibration fits one factor per target (energy, forces) on the
validation split with :func:`blip.uq.recalibration.recalibrate`; scores "after
recalibration" use the test standard deviations times that factor, which is exactly what
``BlipModel.predict`` returns once the factor is stored in the model (the calibrated model
file is written too).
"""

from __future__ import annotations

import copy
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config as config_mod
from ..data import resolve_e0s
from ..evaluate import reference_arrays
from ..io import save_model
from ..predictor import BlipModel
from ..train.datasets import PreparedData, summarise
from ..train.loop import Trainer
from ..uq.metrics import prediction_arrays, regression_metrics
from ..uq.recalibration import calibrated_std, recalibrate, uncalibrated
from .protocols import Budget, Experiment, MethodSpec

#: Metrics of sigma of each target in a row, before (``KEY``) and after (``KEY_recal``) recalibration
#: (Spearman changes only where a widening with the feature distance applies).
PROBABILISTIC = ("nll", "miscalibration_area", "ence", "coverage_68", "coverage_95", "sharpness", "crps",
                 "spearman")
_SCALE_OF = {"energy": "energy", "energy_per_atom": "energy", "forces": "forces"}


@dataclass
class Scored:
    """Flat arrays of one (method, test set): ``{quantity: {"ref", "pred", "std"}}`` and the factors."""

    arrays: dict
    scales: dict


def log(message: str) -> None:
    print(f"[blip bench] {message}", file=sys.stderr, flush=True)


def method_config(exp: Experiment, spec: MethodSpec, budget: Budget, overrides: list[str], out: Path) -> dict:
    """Resolved config of one method: experiment sections, then the method's, then --set overrides."""
    user = copy.deepcopy(exp.config)
    for section in ("model", "uq", "training"):
        user.setdefault(section, {}).update(getattr(spec, section))
    user["data"] = {"train_file": exp.source or None, "e0s": exp.e0s if isinstance(exp.e0s, str) else None}
    user["output_dir"] = str(out)
    cfg = config_mod.resolve(user, overrides)
    t = cfg["training"]
    if "epochs" not in spec.training:  # e.g. "chgnet-as-is" keeps its 0 epochs
        t["epochs"] = budget.epochs_for(len(exp.train), int(t["batch_size"]), spec.name)
    if budget.minutes is not None:  # Trainer splits max_minutes evenly over the networks
        t["max_minutes"] = budget.minutes_for(spec.name) * config_mod.networks_of(cfg)
    t["patience"] = max(int(t["patience"]), int(t["epochs"]) + 1)  # the budget, not early stopping, ends a run
    return cfg


def prepared(exp: Experiment, cfg: dict) -> PreparedData:
    e0s = resolve_e0s(exp.e0s, exp.train + exp.valid, cfg["data"]["energy_key"])
    return PreparedData(exp.train, exp.valid, {}, summarise(exp.train, e0s, float(cfg["model"]["cutoff"])))


def warm_up(exp: Experiment, cfg: dict) -> None:
    """One untimed forward/backward pass, so first-call overheads do not land on the first method."""
    from ..build import build_potential, dtype_of
    from ..data import build_graph, collate

    model = build_potential(cfg, prepared(exp, cfg).summary)
    graphs = [build_graph(s.atoms, float(cfg["model"]["cutoff"]), index=i, energy=s.energy, forces=s.forces)
              for i, s in enumerate(exp.train[:2])]
    out = model(collate(graphs, dtype=dtype_of(cfg)), training=True)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()


def train(exp: Experiment, spec: MethodSpec, cfg: dict, progress: bool) -> tuple:
    """Train one method -> (BlipModel, seconds, log summary).

    With ``training.resume`` (``blip bench --resume``) a run picks up its checkpoint, so
    the seconds are the sum of the epoch times in its log.csv, not this call's wall time.
    """
    out = Path(cfg["output_dir"])
    resume = bool(cfg["training"]["resume"])
    run_cfg = {**cfg, "training": {**cfg["training"], "resume": resume and (out / "checkpoint.pt").is_file()}}
    start = time.perf_counter()
    model = Trainer(run_cfg, progress=progress).run(prepared(exp, run_cfg))
    seconds = time.perf_counter() - start
    summary = _log_summary(out / "log.csv")
    return model, summary["epoch_seconds"] if resume else seconds, summary


def _log_summary(path: Path) -> dict:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {"epochs_run": 0, "best_valid_forces_rmse": None, "epoch_seconds": 0.0}
    epochs_by_member: dict[str, int] = {}
    for r in rows:
        epochs_by_member[r["member"]] = epochs_by_member.get(r["member"], 0) + 1
    best = min(float(r["valid_forces_rmse"]) for r in rows)
    return {"epochs_run": min(epochs_by_member.values()), "best_valid_forces_rmse": best,
            "epoch_seconds": sum(float(r["time_s"]) for r in rows)}


def timed_predict(model, structures, samples, seed: int) -> tuple[dict, float]:
    """``model.predict`` on the structures' atoms -> (prediction, wall seconds)."""
    atoms = [s.atoms for s in structures]
    start = time.perf_counter()
    pred = model.predict(atoms, samples=samples, seed=seed, novelty=True)
    return pred, time.perf_counter() - start


def score(structures, pred) -> dict:
    """Flat ``{quantity: {"ref", "pred", "std"}}`` arrays (std = standard deviation, before calibration)."""
    ref_e, ref_f = reference_arrays(structures)
    n_atoms = np.array([len(s.atoms) for s in structures])
    return prediction_arrays(ref_e, pred["energy"], pred["energy_std"], ref_f, pred["forces"],
                             pred["forces_std"], n_atoms, pred.get("atom_novelty"))


def recalibrated_std(a: dict, q: str, scales: dict) -> np.ndarray:
    """The recalibrated spread of quantity ``q``'s flat arrays ``a``: the factor of its target, and
    where the calibration widens that target (``forces_novelty``, ``energy_novelty`` b) also
    ``exp(b (novelty - centre))`` per entry; forces with the calibration's floors in quadrature."""
    return calibrated_std(a, scales, _SCALE_OF[q])


def row_metrics(arrays: dict, scales: dict) -> dict:
    """Row fields of one (method, test set): RMSEs and every probabilistic metric before/after."""
    row: dict = {}
    for q in ("energy", "energy_per_atom", "forces"):
        a = arrays.get(q)
        err = None if a is None else a["ref"] - a["pred"]
        recal_std = recalibrated_std(a, q, scales) if a is not None else None
        raw = regression_metrics(err, a["std"]) if a is not None else {}
        recal = regression_metrics(err, recal_std) if a is not None else {}
        row[f"{q}_rmse"] = raw.get("rmse")
        row[f"{q}_mae"] = raw.get("mae")
        if q == "energy_per_atom":
            continue
        row[f"{q}_mean_std"] = float(np.mean(a["std"])) if a is not None else None
        row[f"{q}_mean_std_recal"] = float(np.mean(recal_std)) if a is not None else None
        for m in PROBABILISTIC:
            row[f"{q}_{m}"] = raw.get(m)
            row[f"{q}_{m}_recal"] = recal.get(m)
    target = "forces" if "forces" in arrays else "energy"
    row["uq_target"] = target
    for m in PROBABILISTIC:
        row[m] = row[f"{target}_{m}"]
        row[f"{m}_recal"] = row[f"{target}_{m}_recal"]
    row["scale_energy"] = float(scales.get("energy", 1.0))
    row["scale_forces"] = float(scales.get("forces", 1.0))
    return row


def method_dir(runs_dir: Path, exp: Experiment, method: str) -> Path:
    """Where ``blip bench`` trains ``method`` of ``exp`` under one seed's ``runs_dir`` (the
    experiment's name without "=", or "run" for a protocol of one experiment)."""
    return Path(runs_dir) / (exp.name.replace("=", "") or "run") / method


def run_experiment(protocol: str, exp: Experiment, budget: Budget, overrides: list[str], runs_dir: Path,
                   progress: bool, counter: list[int], total: int) -> tuple[list[dict], dict]:
    """Train, recalibrate, score and time every method of ``exp``.

    Returns (rows, scored) with ``scored[(method, test set)]`` = :class:`Scored` for plots.
    ``counter`` ([done]) counts trainings across experiments for the log lines.
    """
    trained = []
    for spec in exp.methods:
        out = method_dir(runs_dir, exp, spec.name)
        cfg = method_config(exp, spec, budget, overrides, out)
        if not trained:
            warm_up(exp, cfg)
        counter[0] += 1
        members = config_mod.networks_of(cfg)
        log(f"({counter[0]}/{total}) {protocol} {exp.name} {spec.name}: training {len(exp.train)} structures, "
            f"{cfg['training']['epochs']} epochs x {members} network(s)"
            + (f", cap {budget.minutes_for(spec.name):g} min each" if budget.minutes else ""))
        model, seconds, summary = train(exp, spec, cfg, progress)
        rmse = summary["best_valid_forces_rmse"]
        log(f"      done in {seconds:.0f} s ({summary['epochs_run']} epochs"
            + (f", best valid force RMSE {1000 * rmse:.1f} meV/Å" if rmse is not None else "") + ")")
        trained.append((spec, cfg, model, seconds, summary))

    rows, scored = [], {}
    seed = int(exp.config["training"]["seed"])
    reference = next((t for t in trained if t[1]["uq"]["method"] == "deterministic"), trained[0])
    timing = exp.tests[0].structures[:exp.timing_structures]
    cost_reference = ("deterministic MAP" if reference[1]["uq"]["method"] == "deterministic"
                      else f"MAP pass of one {reference[0].name} network")
    reference_model = one_network(reference[2])
    for spec, cfg, model, seconds, summary in trained:
        first_row = len(rows)
        ratio = cost_ratio(model, reference_model, timing, seed, exp.timing_repeats)
        log(f"      {exp.name} {spec.name}: predict cost {ratio:.2f} x {cost_reference} "
            f"({len(timing)} structures of {exp.tests[0].name}, median of {exp.timing_repeats})")
        scales = recalibrate(model, exp.valid, seed=seed, source="validation split")
        model.calibration = dict(scales)
        save_model(model, Path(cfg["output_dir"]) / "model_calibrated.pt")
        model.calibration = uncalibrated(scales)  # raw spreads (a mixture's networks keep theirs)
        log(f"      {exp.name} {spec.name}: recalibration factors (validation) "
            + ", ".join(f"{q} {s:.3g}" for q, s in scales.items() if q != "networks") + f"; force spread per {model.force_std}")
        for test in exp.tests:
            pred, pred_seconds = timed_predict(model, test.structures, None, seed)
            arrays = score(test.structures, pred)
            scored[(spec.name, test.name)] = Scored(arrays, scales)
            rows.append({
                "protocol": protocol, "experiment": exp.name, "method": spec.name,
                "uq_method": cfg["uq"]["method"], "test_set": test.name, "n_train": len(exp.train),
                "n_valid": len(exp.valid), "n_structures": len(test.structures),
                "samples": model.default_samples if model.method != "deterministic" else 0,
                "force_std": model.force_std,
                **row_metrics(arrays, scales),
                "train_seconds": seconds, "epochs": int(cfg["training"]["epochs"]),
                "epochs_run": summary["epochs_run"], "predict_seconds": pred_seconds,
                "predict_cost_ratio": ratio, "cost_reference": cost_reference,
            })
        add_sigma_ratios(rows[first_row:], exp.reference_test)
    return rows, scored


def add_sigma_ratios(rows: list[dict], reference_test: str | None) -> None:
    """``{energy,forces}_sigma_ratio`` (and ``_recal``): mean sigma of each test set over that of
    ``reference_test``, before (and after) recalibration.

    Rows are one method's; one factor per target leaves the ratio as it is, the widenings with the
    feature distance (``forces_novelty``, ``energy_novelty``) do not.
    """
    ref = next((r for r in rows if r["test_set"] == reference_test), None)
    for r in rows:
        for q in ("energy", "forces"):
            for tail in ("", "_recal"):
                num = r.get(f"{q}_mean_std{tail}")
                den = None if ref is None else ref.get(f"{q}_mean_std{tail}")
                r[f"{q}_sigma_ratio{tail}"] = num / den if num is not None and den else None
        r["sigma_ratio"] = r[f"{r['uq_target']}_sigma_ratio"]
        r["sigma_ratio_recal"] = r[f"{r['uq_target']}_sigma_ratio_recal"]


def one_network(model):
    """``model`` itself, or for an ensemble a model of its first member alone: the unit of the
    predict cost is one network's MAP pass (an ensemble's own MAP pass runs all its members)."""
    if len(model.members) == 1:
        return model
    return BlipModel(model.members[:1], model.config, model.summary).to(model.device)


def cost_ratio(model, reference, structures, seed: int, repeats: int = 3) -> float:
    """Wall time of ``model.predict`` (default samples) over ``reference``'s MAP predict, same structures.

    The two are timed alternately ``repeats`` times (after one untimed warm-up) and
    the median ratio is returned, so slow drifts of a shared machine's load cancel.
    """
    timed_predict(model, structures[:2], None, seed)
    ratios = []
    for _ in range(repeats):
        t_map = timed_predict(reference, structures, 0, seed)[1]
        t_model = timed_predict(model, structures, None, seed)[1]
        ratios.append(t_model / t_map)
    return float(np.median(ratios))
