"""A recalibration that also widens σ with a structure's distance from the training features, on finished runs.

    OMP_NUM_THREADS=1 python benchmarks/novelty_recalibration.py RUNS_DIR --sets ammonia \
        [--protocol energy-split] [--seeds 0,1,2] [--data ../shared/data] [--distance euclidean] [--per-atom]

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench energy-split`` (or, with ``--protocol
ood-ethanol`` and no ``--sets``, ``blip bench ood-ethanol``) run with BLIP
(``seedS/SET/blip/model_calibrated.pt``); test sets without forces (energy paths) are skipped. For every seed the model predicts its validation split
and test sets without calibration (force spreads per atom or per component, as its recalibration
chose; K = the model's default). Each structure's novelty ``nu`` is the mean over its atoms and the
noisy node layers of ``log m``, ``m`` the squared Mahalanobis distance over the width of the
layer's input features from the training statistics (``FeatureDensity.distance``; with
``--distance euclidean`` the Euclidean one, ``FeatureDensity.euclidean``; the features of one
sampled pass with the run's seed); with ``--per-atom`` each atom's own mean over the layers
widens its force spread instead. Two maps from the raw force sigma to a calibrated one are
fitted on the validation split only, by Gaussian NLL, and scored on every test set:

* ``scale``: ``s sigma`` (what ``blip train`` fits);
* ``novelty``: ``s sigma exp(b (nu - mean nu of the validation structures))`` with ``b >= 0``.

Prints the recalibrated force NLL per component (nats), the 95 % coverage and ``b`` per seed and
test set, then the means over seeds. An offline probe: nothing here changes a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import score
from blip.data import build_graph, collate
from blip.uq.metrics import coverage, nll
from blip.uq.recalibration import fit_scale

CHUNK = 32  # structures per sampled pass of the novelty


def force_arrays(model, structures, seed: int):
    """Residuals, raw sigma and structure index of every force component (flat)."""
    pred = model.predict([s.atoms for s in structures], samples=None, seed=seed)
    forces = score(structures, pred)["forces"]
    structure = np.concatenate([np.full(3 * len(s.atoms), i) for i, s in enumerate(structures)])
    return forces["ref"] - forces["pred"], forces["std"], structure


def novelty(model, structures, seed: int, distance: str = "mahalanobis", per_atom: bool = False) -> np.ndarray:
    """Mean log squared feature distance over the noisy node layers and the atoms of each structure (n,)
    or, ``per_atom``, of each atom (atoms,)."""
    potential = model.members[0]
    rate = potential.inference.rate
    seen: list[torch.Tensor] = []

    def recording(domain, slot, base, features, groups, *args, **kwargs):
        if domain == "node" and features is not None:
            density = potential.inference.densities[domain][str(slot)]
            index = getattr(groups, "index", groups)
            if index is None:
                index = features.new_zeros(features.shape[0], dtype=torch.long)
            with torch.no_grad():
                m = density.euclidean(features, index) if distance == "euclidean" else density.distance(features, index)
                seen.append(m.log())
        return rate(domain, slot, base, features, groups, *args, **kwargs)

    potential.inference.rate = recording
    out = []
    try:
        for start in range(0, len(structures), CHUNK):
            chunk = structures[start:start + CHUNK]
            batch = collate([build_graph(s.atoms, model.cutoff, index=start + i) for i, s in enumerate(chunk)],
                            dtype=model.dtype)
            seen.clear()
            with torch.no_grad():
                potential.rates(batch, seed=seed)
            atoms = torch.stack(seen, dim=1).mean(dim=1)
            out.append(atoms if per_atom else torch.zeros(len(chunk), dtype=atoms.dtype).index_add(
                0, batch["batch"], atoms) / batch["n_atoms"].to(atoms.dtype))
    finally:
        potential.inference.rate = rate
    return torch.cat(out).numpy()


def fit_novelty(err: np.ndarray, sigma: np.ndarray, nu: np.ndarray) -> tuple[float, float]:
    """(s, b >= 0) of ``s sigma exp(b nu)`` by Gaussian NLL on validation residuals (``nu`` centred)."""
    s0 = fit_scale(err, sigma)
    result = minimize(lambda x: nll(err, s0 * np.exp(x[0]) * sigma * np.exp(x[1] * nu)), [0.0, 0.0],
                      method="L-BFGS-B", bounds=[(None, None), (0.0, None)])
    return float(s0 * np.exp(result.x[0])), float(result.x[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--sets", default=None, help="the experiment (as for blip bench --sets)")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--distance", default="mahalanobis", choices=("mahalanobis", "euclidean"))
    parser.add_argument("--per-atom", action="store_true")
    args = parser.parse_args()
    atom_of = (lambda structure, n_components: np.repeat(np.arange(n_components // 3), 3)) if args.per_atom else \
        (lambda structure, n_components: structure)
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data),
                          Options(seed=seed, experiments=[args.sets] if args.sets else None))
        exp = plan.experiments[0]
        folder = exp.name.replace("=", "") or "run"  # as blip bench names its runs
        model = blip.load(str(Path(args.runs_dir) / f"seed{seed}" / folder / "blip" / "model_calibrated.pt"))
        model.calibration = {"energy": 1.0, "forces": 1.0}
        err_v, sigma_v, structure_v = force_arrays(model, exp.valid, seed)
        nu_v = novelty(model, exp.valid, seed, args.distance, args.per_atom)
        centre = float(nu_v.mean())
        s_scale = fit_scale(err_v, sigma_v)
        s_nov, b = fit_novelty(err_v, sigma_v, nu_v[atom_of(structure_v, len(err_v))] - centre)
        for test in exp.tests:
            if any(s.forces is None for s in test.structures):
                continue  # an energy-only path
            err, sigma, structure = force_arrays(model, test.structures, seed)
            nu = novelty(model, test.structures, seed, args.distance, args.per_atom)[atom_of(structure, len(err))] - centre
            plain, widened = s_scale * sigma, s_nov * sigma * np.exp(b * nu)
            row = (nll(err, plain), coverage(err, plain, 0.95), nll(err, widened), coverage(err, widened, 0.95))
            rows.setdefault(test.name, []).append(row)
            print(f"seed {seed} {test.name:12s} scale: NLL {row[0]:8.3f} cov {row[1]:.2f}   "
                  f"novelty: NLL {row[2]:8.3f} cov {row[3]:.2f}   b {b:.2f}", flush=True)
    for name, values in rows.items():
        mean = np.mean(np.array(values), axis=0)
        print(f"mean {name:12s} scale: NLL {mean[0]:8.3f} cov {mean[1]:.2f}   novelty: NLL {mean[2]:8.3f} cov {mean[3]:.2f}")


if __name__ == "__main__":
    main()
