"""Probe: a last-layer (LLPR-style) force spread from a trained BLIP-PaiNN's noise-free network.

    BLIP_DATA=../shared/data OMP_NUM_THREADS=1 python last_layer_rigidity.py RUNS_DIR SET SEEDS   # e.g. RUNS ammonia 0,1,2

RUNS_DIR is the ``--runs-dir`` of a ``blip bench energy-split`` run with BLIP. For each seed the
readout's hidden features phi_i (the 32 SiLU outputs before its last linear layer) give, per
structure, Phi = scale * sum_i phi_i and its Jacobian J = dPhi/dr (32 backward passes). The
posterior of the last layer's weights under Gaussian noise (the MAP model's training RMSE for
energies and forces) has precision A = sum_train (Phi Phi^T / s_E^2 + J J^T / s_F^2) + lam I, and
each force component's spread is sqrt(J^T A^-1 J). Fitted on the validation split by one factor
(and, "comb", together with BLIP's own spread in quadrature), scored on the test sets: force NLL,
the Spearman correlation of the structures' RMS error with their RMS spread (rho), coverage and
the spread's ratio to the in-distribution one. BLIP's spread here is the raw K = 16 spread times
one factor (no feature-distance widening, unlike the bench).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import spearmanr

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import reference_arrays, score
from blip.data import build_graph, collate
from blip.uq.metrics import coverage, nll
from blip.uq.recalibration import fit_scale

LAMBDA = 1e-4  # ridge, relative to the mean eigenvalue of A


def features_and_jacobians(model, structures):
    """Per structure: Phi (D,) and J (D, 3 n) of the noise-free network, float64 numpy."""
    potential = model.members[0]
    backbone = potential.backbone
    cache = {}
    hook = backbone.readout[1].register_forward_hook(lambda m, i, o: cache.__setitem__("phi", o))
    prepare = backbone.prepare

    def prepare_with_positions(batch):
        batch = prepare(batch)
        batch["positions"] = cache["positions"] = batch["positions"].detach().requires_grad_(True)
        return batch

    backbone.prepare = prepare_with_positions
    phis, jacobians = [], []
    try:
        for k, s in enumerate(structures):
            potential(collate([build_graph(s.atoms, model.cutoff, index=k)], dtype=model.dtype), forces=False)
            phi = (backbone.scale * cache["phi"]).sum(0)
            rows = [torch.autograd.grad(phi[d], cache["positions"], retain_graph=True)[0].reshape(-1)
                    for d in range(phi.shape[0])]
            phis.append(phi.detach().double().numpy())
            jacobians.append(torch.stack(rows).detach().double().numpy())
    finally:
        hook.remove()
        backbone.prepare = prepare
    return phis, jacobians


def blip_forces(model, structures, seed, samples=None):
    f = score(structures, model.predict([s.atoms for s in structures], samples=samples, seed=seed))["forces"]
    return f["ref"] - f["pred"], f["std"]


def main() -> None:
    runs, name, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    torch.set_num_threads(1)
    for seed in seeds:
        exp = build_plan("energy-split", data_dir(None), Options(seed=seed, experiments=[name])).experiments[0]
        model = blip.load(str(Path(runs) / f"seed{seed}" / exp.name / "blip" / "model_calibrated.pt"))
        model.calibration = {"energy": 1.0, "forces": 1.0}
        phis, jacobians = features_and_jacobians(model, exp.train)
        s_f = np.sqrt(np.mean(blip_forces(model, exp.train, seed, samples=0)[0] ** 2))
        s_e = np.sqrt(np.mean((reference_arrays(exp.train)[0]
                               - model.predict([s.atoms for s in exp.train], samples=0)["energy"]) ** 2))
        precision = sum(j @ j.T for j in jacobians) / s_f ** 2 + sum(np.outer(p, p) for p in phis) / s_e ** 2
        dim = precision.shape[0]
        cov = np.linalg.inv(precision + LAMBDA * np.trace(precision) / dim * np.eye(dim))
        sets = {"valid": exp.valid} | {t.name: t.structures for t in exp.tests}
        data = {}
        for key, structures in sets.items():
            err, sigma_blip = blip_forces(model, structures, seed)
            jac = np.concatenate(features_and_jacobians(model, structures)[1], axis=1)
            which = np.concatenate([np.full(3 * len(s.atoms), i) for i, s in enumerate(structures)])
            data[key] = {"err": err, "blip": sigma_blip, "llpr": np.sqrt(np.einsum("dn,de,en->n", jac, cov, jac)),
                         "which": which}
        v = data["valid"]
        s_b, s_l = fit_scale(v["err"], v["blip"]), fit_scale(v["err"], v["llpr"])
        x = minimize(lambda x: nll(v["err"], np.hypot(np.exp(x[0]) * v["blip"], np.exp(x[1]) * v["llpr"])),
                     [np.log(s_b) - 0.35, np.log(s_l) - 0.35], method="Nelder-Mead").x
        cells = []
        for key, d in data.items():
            if key == "valid":
                continue
            rms = lambda a: np.sqrt(np.bincount(d["which"], a ** 2) / np.bincount(d["which"]))  # noqa: E731
            rho = lambda sigma: spearmanr(rms(d["err"]), rms(sigma))[0]  # noqa: E731
            both = np.hypot(np.exp(x[0]) * d["blip"], np.exp(x[1]) * d["llpr"])
            cells.append(f"{key}: blip {nll(d['err'], s_b * d['blip']):6.3f} (rho {rho(d['blip']):.2f}) "
                         f"llpr {nll(d['err'], s_l * d['llpr']):6.3f} (rho {rho(d['llpr']):.2f}, "
                         f"cov {coverage(d['err'], s_l * d['llpr'], 0.95):.2f}, "
                         f"ratio {np.mean(d['llpr']) / np.mean(data['valid']['llpr']):.1f}) "
                         f"comb {nll(d['err'], both):6.3f}")
        print(f"seed {seed} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
