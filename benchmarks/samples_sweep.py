"""How many samples? Recalibrated uncertainty metrics of trained bench models against K.

    OMP_NUM_THREADS=1 python benchmarks/samples_sweep.py energy-split RUNS_DIR --data ../shared/data \
        --out docs/results/samples

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seed0/``, ``seed1/``, ...
inside when it ran several seeds). For every seed, experiment and stochastic method found
there, the protocol's split of that seed is rebuilt, and for each K the model is
recalibrated on the validation split with K samples and scored on every test set with K
samples (the same seed, so the first K samples are shared between K values); with one K
(``--samples 16``), trained runs recalibrated and scored again with the current code, as
``blip bench`` would (results.json also holds the recalibrated Spearman, the σ ratio to the
reference test set and the RMSEs, eV or eV/Å). The 5-member
ensemble's row is scored once, as a reference. ``--force-std atom,component`` scores every
model with each force spread (``uq.force_std``; the method's rows are then labelled
``METHOD/atom`` and ``METHOD/component``). ``--set uq.KEY=VALUE`` (repeatable) changes a
recalibration setting of every model (as ``blip calibrate --set``) before its recalibration, e.g.
``--set uq.energy_novelty_widening=true`` to score that setting on trained models. Prints a table of mean ± std over seeds and
writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import add_sigma_ratios, method_dir, row_metrics, score, timed_predict
from blip.uq.recalibration import recalibrate, uncalibrated, with_settings

KS = (2, 4, 8, 16, 32)  # K = 1 has no spread
METRICS = ("forces_nll_recal", "ence_recal", "spearman", "coverage_95_recal", "energy_nll_recal",
           "spearman_recal", "sigma_ratio_recal", "forces_rmse", "energy_rmse")


def _seed_dirs(runs: Path) -> list[tuple[int, Path]]:
    seeds = sorted((int(p.name[4:]), p) for p in runs.glob("seed*") if p.name[4:].isdigit())
    return seeds or [(0, runs)]


def sweep(protocol: str, runs: Path, data: Path, ks: tuple[int, ...], methods: tuple[str, ...],
          seeds: set[int] | None = None, sets: list[str] | None = None,
          force_stds: tuple[str, ...] | None = None, overrides: list[str] | None = None) -> list[dict]:
    rows = []
    for seed, folder in _seed_dirs(runs):
        if seeds is not None and seed not in seeds:
            continue
        plan = build_plan(protocol, data, Options(seed=seed, experiments=sets))
        for exp in plan.experiments:
            for method in methods:
                path = method_dir(folder, exp, method) / "model.pt"
                if not path.is_file():
                    continue
                model = blip.load(path)
                if overrides:
                    model.config = with_settings(model.config, overrides)
                for force_std in force_stds or (None,):
                    label = method if force_std is None else f"{method}/{force_std}"
                    if force_std is not None:
                        model.config["uq"]["force_std"] = force_std
                    for k in ([None] if model.method == "ensemble" else ks):
                        start = time.perf_counter()
                        scales = recalibrate(model, exp.valid, samples=k, seed=seed)
                        model.calibration = uncalibrated(scales)
                        scored = []
                        for test in exp.tests:
                            pred, _ = timed_predict(model, test.structures, k, seed)
                            scored.append({"test_set": test.name, **row_metrics(score(test.structures, pred), scales)})
                        add_sigma_ratios(scored, exp.reference_test)
                        rows += [{"seed": seed, "experiment": exp.name, "method": label, "test_set": r["test_set"],
                                  "samples": len(model.members) if k is None else k,
                                  **{m: r.get(m) for m in METRICS}} for r in scored]
                        print(f"seed {seed} {exp.name} {label} K={rows[-1]['samples']}: "
                              f"{time.perf_counter() - start:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["test_set"], r["method"], r["samples"]), []).append(r)
    out = []
    for (exp, test, method, k), rs in groups.items():
        row = {"experiment": exp, "test_set": test, "method": method, "samples": k, "n_seeds": len(rs)}
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None and np.isfinite(r[m])]
            row[m] = float(np.mean(vals)) if vals else None
            row[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out.append(row)
    return out


def markdown(summary: list[dict], protocol: str) -> str:
    def cell(r, m):
        if r[m] is None:
            return "–"
        return f"{r[m]:.3g}" + (f" ± {r[m + '_std']:.2g}" if r[m + "_std"] is not None else "")

    lines = [f"# Samples sweep on {protocol}", "",
             "Recalibrated on the validation split with the same K; mean ± std over seeds.", ""]
    for exp, test in dict.fromkeys((r["experiment"], r["test_set"]) for r in summary):
        lines += [f"## {exp} {test}", "", "| method | K | F NLL | ENCE | Spearman | cov. 95% | E NLL |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in summary if r["experiment"] == exp and r["test_set"] == test):
            lines.append(f"| {r['method']} | {r['samples']} | " + " | ".join(cell(r, m) for m in METRICS[:4])
                         + f" | {cell(r, 'energy_nll_recal')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol")
    parser.add_argument("runs", type=Path)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/samples"))
    parser.add_argument("--samples", default=",".join(map(str, KS)), help="comma-separated K values")
    parser.add_argument("--methods", default="blip,mc_dropout,ensemble")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to score (default: all found)")
    parser.add_argument("--sets", default=None, help="comma-separated experiments of the protocol (default: all)")
    parser.add_argument("--force-std", default=None,
                        help="comma-separated uq.force_std values to score each model with (default: the model's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a recalibration setting of every model first, e.g. uq.energy_novelty_widening=true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = sweep(args.protocol, args.runs, data_dir(args.data), tuple(int(k) for k in args.samples.split(",")),
                 tuple(args.methods.split(",")),
                 seeds={int(s) for s in args.seeds.split(",")} if args.seeds else None,
                 sets=args.sets.split(",") if args.sets else None,
                 force_stds=tuple(args.force_std.split(",")) if args.force_std else None, overrides=args.set)
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    text = markdown(summary, args.protocol)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
