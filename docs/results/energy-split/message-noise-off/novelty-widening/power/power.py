"""Rescoring probe: a power of the spread fitted at recalibration, sigma' = s * (sigma_w / g)^a,
sigma_w the default-widened spread (b = 0.1), g its validation geometric mean; (s, a) fitted on the
validation split by Gaussian NLL; against b = 0.1 alone (the default). "rawpow": the power on the
noise's spread alone, the widening exp(0.1 (nu - c)) kept outside it."""
import argparse, sys
from pathlib import Path
import numpy as np, torch
from scipy.optimize import minimize
import blip
from blip.allocator import keep_freed_memory
from blip.bench.protocols import Options, build_plan, data_dir
from blip.evaluate import evaluate_structures
from blip.uq.metrics import regression_metrics, nll
from blip.uq.recalibration import fit_scale

p = argparse.ArgumentParser()
p.add_argument("runs_dir"); p.add_argument("--sets", default=None); p.add_argument("--protocol", default="energy-split")
p.add_argument("--seeds", default="0,1,2"); p.add_argument("--method", default="blip")
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
    c = float(np.mean(valid["novelty"]))
    def widened(a):
        return a["std"] * np.exp(0.1 * (a["novelty"] - c))
    vw = widened(valid); verr = valid["ref"] - valid["pred"]
    s0 = fit_scale(verr, vw)
    g = float(np.exp(np.mean(np.log(vw))))
    res = minimize(lambda x: nll(verr, np.exp(x[0]) * s0 * g * (vw / g) ** x[1]), [0.0, 1.0], method="Nelder-Mead")
    ls, a_pow = res.x
    print(f"seed {seed} fitted power a = {a_pow:.3f}", flush=True)
    vraw = valid["std"]; gr = float(np.exp(np.mean(np.log(vraw))))
    nov = lambda arr: np.exp(0.1 * (arr["novelty"] - c))
    res2 = minimize(lambda x: nll(verr, np.exp(x[0]) * s0 * gr * (vraw / gr) ** x[1] * nov(valid)), [0.0, 1.0], method="Nelder-Mead")
    ls2, a2 = res2.x
    print(f"seed {seed} fitted raw power a = {a2:.3f}", flush=True)
    for name, arr in arrays.items():
        err = arr["ref"] - arr["pred"]; w = widened(arr)
        raw_pow = np.exp(ls2) * s0 * gr * (arr["std"] / gr) ** a2 * nov(arr)
        for variant, std in (("b0.1", s0 * w), ("power", np.exp(ls) * s0 * g * (w / g) ** a_pow), ("rawpow", raw_pow)):
            m = regression_metrics(err, std)
            scores.setdefault((name, variant), []).append((m["nll"], m["coverage_95"], a_pow))
            print(f"seed {seed} {name:14s} {variant:6s} NLL {m['nll']:8.3f} cov {m['coverage_95']:.2f}", flush=True)
for (name, variant), rows in sorted(scores.items()):
    mean = np.mean(np.array(rows), axis=0)
    print(f"mean {name:14s} {variant:6s} NLL {mean[0]:8.3f} cov {mean[1]:.2f} a {mean[2]:.2f}")
