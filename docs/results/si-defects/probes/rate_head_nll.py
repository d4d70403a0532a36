"""Probe (rejected): fit the rate heads' bounded MLPs after training by the Gaussian NLL of the
noise-free model's force residuals on the training structures, the variance from K sampled passes.

    OMP_NUM_THREADS=1 python rate_head_nll.py RUNS [--protocol si-defects] [--set NAME] [--seed S] \
        [--on train|valid] [--steps 150] [--k 2]

RUNS: the ``--runs-dir`` of a ``blip bench`` run (``[seedS/]SET/blip/model_calibrated.pt``). Only
the heads' MLPs train (backbone, distance slopes and feature statistics fixed), with one free
scale s: NLL of r = F_ref - F_MAP under N(0, s^2 var + floor^2), var the atom's mean squared sample
deviation from the MAP force (K fixed-seed-per-step samples), batches of 4 structures, Adam 3e-3.
Before and after, blip's own recalibration (``benchmarks/recalibration_forms.py``'s ``blip`` form:
factor, widening, floor, fitted on the validation split) is scored on every test set.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
from recalibration_forms import FLOOR, fit_form, force_arrays  # noqa: E402

import blip  # noqa: E402
from blip.bench.protocols import Options, build_plan, data_dir  # noqa: E402
from blip.data.batch import collate, replicate  # noqa: E402
from blip.data.graph import build_graph  # noqa: E402
from blip.uq.metrics import coverage, nll  # noqa: E402


def evaluate(model, exp, seed: int, tag: str) -> float:
    valid = force_arrays(model, exp.valid, seed)
    floor = FLOOR * float(np.sqrt(np.mean(valid["err"] ** 2)))
    calibrate = fit_form("blip", valid["err"], valid["std"], valid["species"], valid["force"], valid["novelty"], floor)
    cells = []
    for test in exp.tests:
        a = force_arrays(model, test.structures, seed)
        if a is not None:
            s = calibrate(a["std"], a["species"], a["force"], a["novelty"])
            cells.append(f"{test.name} {nll(a['err'], s):.3f} ({coverage(a['err'], s, 0.95):.2f}, "
                         f"Spearman {spearmanr(np.abs(a['err']), a['std']).statistic:.2f})")
    print(tag, " | ".join(cells), flush=True)
    return floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("--protocol", default="si-defects")
    ap.add_argument("--set", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on", choices=("train", "valid"), default="train")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    exp = build_plan(a.protocol, data_dir(a.data), Options(seed=a.seed, experiments=[a.set] if a.set else None)).experiments[0]
    runs = Path(a.runs) / f"seed{a.seed}"
    runs = runs if runs.is_dir() else Path(a.runs)
    model = blip.load(str(runs / (exp.name.replace("=", "") or "run") / "blip" / "model_calibrated.pt"))
    model.calibration = {"energy": 1.0, "forces": 1.0}
    model.config["uq"]["samples"] = 16
    floor = evaluate(model, exp, a.seed, "before")

    pot = model.members[0].eval()
    for p in pot.parameters():
        p.requires_grad_(False)
    params = [p for head in pot.inference.heads_list() for p in head.net.parameters()]
    for p in params:
        p.requires_grad_(True)
    log_s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([{"params": params}, {"params": [log_s], "lr": 3e-2}], lr=3e-3)
    structures = list(exp.train if a.on == "train" else exp.valid)
    graphs = [build_graph(s.atoms, model.cutoff, index=i) for i, s in enumerate(structures)]
    f_map = model.predict([s.atoms for s in structures], samples=0)["forces"]
    residuals = [torch.tensor(np.asarray(s.forces) - f) for s, f in zip(structures, f_map)]
    f_map = [torch.tensor(f) for f in f_map]
    rng = np.random.default_rng(0)
    for step in range(a.steps):
        idx = rng.choice(len(structures), min(4, len(structures)), replace=False)
        batch = collate([graphs[i] for i in idx], dtype=model.dtype, device=model.device)
        n = batch["positions"].shape[0]
        rep = pot.backbone.prepare(dict(replicate(batch, a.k)))
        positions = rep["positions"].detach().requires_grad_(True)
        rep["positions"] = positions
        ctx = pot._context(rep, int(rng.integers(2 ** 31)), update=False, training=False)
        with pot.noise_state.use(ctx):
            energy = pot.backbone.energy(rep)
        forces = -torch.autograd.grad(energy.sum(), positions, create_graph=True)[0].reshape(a.k, n, 3).double()
        mean, r = torch.cat([f_map[i] for i in idx]), torch.cat([residuals[i] for i in idx])
        var = ((forces - mean) ** 2).mean(dim=(0, 2))[:, None]
        if step == 0:  # start the scale where one factor fits
            with torch.no_grad():
                log_s.fill_(0.5 * float(torch.log((r ** 2).mean() / var.mean())))
        v = torch.exp(2 * log_s) * var + floor ** 2
        loss = (0.5 * torch.log(v) + r ** 2 / (2 * v)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    evaluate(model, exp, a.seed, "after ")


if __name__ == "__main__":
    main()
