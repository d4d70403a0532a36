"""Score each network of a bench model of several networks (``uq.networks``) alone, its own
calibration refitted on the validation split, on the protocol's test sets (the mixture's scores
are the bench's own results); prints one line per network and test set.

    OMP_NUM_THREADS=1 python score_networks.py energy-split RUNS/seedS --seed S --sets ammonia --backbone mace
"""
import argparse
from pathlib import Path
import torch, blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import method_dir, row_metrics, score, timed_predict, add_sigma_ratios
from blip.uq.recalibration import recalibrate, uncalibrated

p = argparse.ArgumentParser(); p.add_argument("protocol"); p.add_argument("runs"); p.add_argument("--seed", type=int)
p.add_argument("--sets", default=None); p.add_argument("--backbone", default="painn")
a = p.parse_args(); torch.set_num_threads(1)
opts = Options(seed=a.seed, experiments=[a.sets] if a.sets else None, backbone=a.backbone)
exp = build_plan(a.protocol, data_dir(None), opts).experiments[0]
full = blip.load(str(method_dir(Path(a.runs), exp, "blip") / "model_calibrated.pt"))
for m, model in enumerate(full.networks()):
    name = f"network {m}"
    scales = recalibrate(model, exp.valid, seed=a.seed, source="validation split")
    model.calibration = uncalibrated(scales)
    rows = []
    for test in exp.tests:
        pred, _ = timed_predict(model, test.structures, None, a.seed)
        rows.append({"test_set": test.name, **row_metrics(score(test.structures, pred), scales)})
    add_sigma_ratios(rows, exp.reference_test)
    for r in rows:
        q = r["uq_target"]
        print(f"seed {a.seed} {name} {r['test_set']:16s} RMSE {1000*r[f'{q}_rmse']:7.1f} NLL {r['nll_recal']:7.3f} "
              f"cov {r['coverage_95_recal']:.2f} ratio {r['sigma_ratio_recal'] or 0:.2f}", flush=True)
