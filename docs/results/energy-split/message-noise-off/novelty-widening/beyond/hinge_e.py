"""Rescoring probe: a hinge on the force widening beyond the validation range of nu,
sigma' = s sigma exp(0.1 (nu - c) + b2 max(0, nu - q)), q the validation q-quantile of nu (s refitted),
against b = 0.1 alone (the default)."""
import argparse
from pathlib import Path
import numpy as np, torch
import blip
from blip.allocator import keep_freed_memory
from blip.bench.protocols import Options, build_plan, data_dir
from blip.evaluate import evaluate_structures
from blip.uq.metrics import regression_metrics
from blip.uq.recalibration import fit_scale

p = argparse.ArgumentParser()
p.add_argument("runs_dir"); p.add_argument("--sets", default=None); p.add_argument("--protocol", default="energy-split")
p.add_argument("--seeds", default="0,1,2"); p.add_argument("--method", default="blip")
p.add_argument("--b2", default="0.2,0.4,0.8"); p.add_argument("--quantiles", default="0.99,1.0")
p.add_argument("--samples", type=int, default=None)
p.add_argument("--target", default="energy")
p.add_argument("--b0", type=float, default=0.2)
args = p.parse_args()
TARGET, B0 = args.target, args.b0
keep_freed_memory(); torch.set_num_threads(1)
scores = {}
for seed in (int(s) for s in args.seeds.split(",")):
    plan = build_plan(args.protocol, data_dir("/work/shared/data"), Options(seed=seed, experiments=[args.sets] if args.sets else None))
    exp = plan.experiments[0]
    folder = exp.name.replace("=", "") or "run"
    model = blip.load(str(Path(args.runs_dir) / f"seed{seed}" / folder / args.method / "model_calibrated.pt"))
    model.calibration = {"energy": 1.0, "forces": 1.0}
    tests = [t for t in exp.tests if all(getattr(s, TARGET) is not None for s in t.structures)]
    valid = evaluate_structures(model, exp.valid, samples=args.samples, seed=seed)[1][TARGET]
    arrays = {t.name: evaluate_structures(model, t.structures, samples=args.samples, seed=seed)[1][TARGET] for t in tests}
    c = float(np.mean(valid["novelty"]))
    verr = valid["ref"] - valid["pred"]
    variants = {f"b={B0}": (0.0, np.inf)}
    for qq in args.quantiles.split(","):
        q = float(np.quantile(valid["novelty"], float(qq)))
        for b2 in args.b2.split(","):
            variants[f"q{qq}b2={b2}"] = (float(b2), q)
    ref_sigma = None
    for name, (b2, q) in variants.items():
        w = lambda a: a["std"] * np.exp(B0 * (a["novelty"] - c) + b2 * np.maximum(0.0, a["novelty"] - q))
        s = fit_scale(verr, w(valid))
        ref = float(np.mean(s * w(arrays[exp.reference_test]))) if exp.reference_test in arrays else np.nan
        for tname, arr in arrays.items():
            std = s * w(arr)
            m = regression_metrics(arr["ref"] - arr["pred"], std)
            above = float(np.mean(arr["novelty"] > q)) if np.isfinite(q) else 0.0
            scores.setdefault((tname, name), []).append((m["nll"], m["coverage_95"], float(np.mean(std)) / ref, above))
            print(f"seed {seed} {tname:14s} {name:14s} SP {m['spearman']:.3f} NLL {m['nll']:8.3f} cov {m['coverage_95']:.2f} "
                  f"sigma ratio {float(np.mean(std)) / ref:7.2f} above q {above:.3f}", flush=True)
for (tname, name), rows in sorted(scores.items()):
    mean = np.mean(np.array(rows), axis=0)
    print(f"mean {tname:14s} {name:14s} NLL {mean[0]:8.3f} cov {mean[1]:.2f} sigma ratio {mean[2]:7.2f} above q {mean[3]:.3f}")
