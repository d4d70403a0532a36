"""Noise-free energy error (eV, and meV per atom) of a si-defects model, mean and std over structures.

    OMP_NUM_THREADS=1 python energy_offsets.py RUNS/run/blip/model_calibrated.pt SEED

Scores the first 60 training structures, the validation split and the first 40 structures of each
test set of the si-defects plan of SEED (MACE); a model of several networks is scored by its first.
A constant offset shows as a mean far from zero with a small std.
"""
import sys

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir

torch.set_num_threads(1)
seed = int(sys.argv[2])
experiment = build_plan("si-defects", data_dir(None), Options(seed=seed, backbone="mace")).experiments[0]
model = blip.load(sys.argv[1])
if model.mixture:
    model = model.networks()[0]
sets = [("train", experiment.train[:60]), ("valid", experiment.valid)]
sets += [(test.name, test.structures[:40]) for test in experiment.tests]
for label, structures in sets:
    predicted = model.predict([s.atoms for s in structures], samples=0)["energy"]
    n = np.array([len(s.atoms) for s in structures])
    error = np.array([float(e) - s.energy for e, s in zip(predicted, structures)])
    print(label, "n_atoms %d-%d" % (n.min(), n.max()),
          "E err mean %.3f std %.3f eV; per atom mean %.2f std %.2f meV"
          % (error.mean(), error.std(), 1000 * (error / n).mean(), 1000 * (error / n).std()))
