"""Rescoring probe: the force widening's b in units of the validation spread of nu,
sigma' = s sigma exp(b' (nu - c) / sd_nu), against the absolute b = 0.1 (the default)."""
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
p.add_argument("--norm-b", default="0.05,0.1,0.2,0.3")
args = p.parse_args()
keep_freed_memory(); torch.set_num_threads(1)
scores = {}
for seed in (int(s) for s in args.seeds.split(",")):
    plan = build_plan(args.protocol, data_dir("/work/shared/data"), Options(seed=seed, experiments=[args.sets] if args.sets else None))
    exp = plan.experiments[0]
    folder = exp.name.replace("=", "") or "run"
    model = blip.load(str(Path(args.runs_dir) / f"seed{seed}" / folder / args.method / "model_calibrated.pt"))
    model.calibration = {"energy": 1.0, "forces": 1.0}
    tests = [t for t in exp.tests if all(s.forces is not None for s in t.structures)]
    valid = evaluate_structures(model, exp.valid, samples=None, seed=seed)[1]["forces"]
    arrays = {t.name: evaluate_structures(model, t.structures, samples=None, seed=seed)[1]["forces"] for t in tests}
    c, sd = float(np.mean(valid["novelty"])), float(np.std(valid["novelty"]))
    verr = valid["ref"] - valid["pred"]
    variants = {"b=0.1": 0.1}
    variants.update({f"b'={x}": float(x) / sd for x in args.norm_b.split(",")})
    print(f"seed {seed} sd_nu {sd:.3f} (b' = 0.1 is b = {0.1 / sd:.3f})", flush=True)
    for name, b in variants.items():
        w = lambda a: a["std"] * np.exp(b * (a["novelty"] - c))
        s = fit_scale(verr, w(valid))
        for tname, arr in arrays.items():
            m = regression_metrics(arr["ref"] - arr["pred"], s * w(arr))
            scores.setdefault((tname, name), []).append((m["nll"], m["coverage_95"], b))
            print(f"seed {seed} {tname:14s} {name:8s} NLL {m['nll']:8.3f} cov {m['coverage_95']:.2f}", flush=True)
for (tname, name), rows in sorted(scores.items()):
    mean = np.mean(np.array(rows), axis=0)
    print(f"mean {tname:14s} {name:8s} NLL {mean[0]:8.3f} cov {mean[1]:.2f} b {mean[2]:.3f}")
