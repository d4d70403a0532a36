"""Per-atom look at a trained si-defects model: force error, recalibrated spread and feature distance
by test set and by coordination (neighbours within 2.8 A)."""
import sys
from pathlib import Path
import numpy as np, torch
from scipy.stats import spearmanr
from ase.neighborlist import neighbor_list
import blip
from blip.allocator import keep_freed_memory
from blip.bench.protocols import Options, build_plan, data_dir

keep_freed_memory(); torch.set_num_threads(1)
runs, method, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = build_plan("si-defects", data_dir("/work/shared/data"), Options(seed=seed))
exp = plan.experiments[0]
model = blip.load(str(Path(runs) / f"seed{seed}" / "run" / method / "model_calibrated.pt"))
print("calibration", {k: round(float(v), 3) for k, v in model.calibration.items()})
for t in exp.tests:
    atoms = [s.atoms for s in t.structures]
    pred = model.predict(atoms, seed=seed, novelty=True)
    err = np.concatenate([np.linalg.norm(p - s.forces, axis=1) for p, s in zip(pred["forces"], t.structures)])
    std = np.concatenate([np.asarray(x) if np.ndim(x) == 1 else np.linalg.norm(x, axis=1) / np.sqrt(3)
                          for x in pred["forces_std"]])
    nu = np.concatenate(pred["atom_novelty"]) if "atom_novelty" in pred else np.zeros_like(err)
    coord = np.concatenate([np.bincount(neighbor_list("i", a, 2.8), minlength=len(a)) for a in atoms])
    lim = float(model.calibration.get("novelty_limit", np.inf))
    print(f"{t.name:18s} atoms {len(err):5d} |err| {err.mean():.3f} sigma {std.mean():.3f} "
          f"rho(sigma,err) {spearmanr(std, err)[0]:.2f} rho(nu,err) {spearmanr(nu, err)[0]:.2f} "
          f"beyond {np.mean(nu > lim):.2f} nu mean {nu.mean():.2f}")
    for c in sorted(set(coord.tolist())):
        m = coord == c
        if m.sum() >= 5:
            print(f"    coordination {c}: {m.sum():5d} atoms |err| {err[m].mean():.3f} sigma {std[m].mean():.3f} "
                  f"nu {nu[m].mean():.2f} beyond {np.mean(nu[m] > lim):.2f}")
