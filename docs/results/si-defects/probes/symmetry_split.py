"""Force NLL of a trained si-defects model split by whether the reference force component is zero
(|F| < 1e-4 eV/A: by symmetry, the perfect strained lattices of the Elastic group and the symmetric
planes of the surface slabs) or not, and with the recalibrated spread floored in quadrature,
sqrt(sigma^2 + floor^2), floor 1 meV/A (about the precision of DFT forces).

    OMP_NUM_THREADS=1 python symmetry_split.py RUNS/seed0/run/METHOD/model_calibrated.pt 0 [SAMPLE_SEED]

SAMPLE_SEED: the seed of the prediction's samples (default: the run's seed, as the bench).

A spread of exactly zero (an ensemble's, or BLIP's with draws shared per structure, on a component
that is zero by symmetry) is floored at 1e-30 eV/A in the split so that its NLL stays defined."""
import sys

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.uq.metrics import nll

FLOOR = 1e-3  # eV/A

torch.set_num_threads(1)
path, seed = sys.argv[1], int(sys.argv[2])
sample_seed = int(sys.argv[3]) if len(sys.argv) > 3 else seed
experiment = build_plan("si-defects", data_dir("/work/shared/data"), Options(seed=seed)).experiments[0]
model = blip.load(path)
for test in experiment.tests:
    pred = model.predict([s.atoms for s in test.structures], seed=sample_seed, novelty=True)
    ref = np.concatenate([s.forces for s in test.structures]).ravel()
    err = ref - np.concatenate(pred["forces"]).ravel()
    std = np.concatenate([np.broadcast_to(np.asarray(x).reshape(len(x), -1), (len(x), 3))
                          for x in pred["forces_std"]]).ravel()
    floored = np.sqrt(std ** 2 + FLOOR ** 2)
    cover = np.mean(np.abs(err) < 1.96 * floored)
    std = np.maximum(std, 1e-30)
    zero = np.abs(ref) < 1e-4
    line = f"{test.name:18s} floored: NLL {nll(err, floored):6.2f} coverage {cover:.3f} | split: all {nll(err, std):8.2f}"
    if zero.any():
        line += f" | zero by symmetry ({zero.mean():.2f} of the components) {nll(err[zero], std[zero]):8.2f}"
    print(line + f" | the rest {nll(err[~zero], std[~zero]):8.2f}", flush=True)
