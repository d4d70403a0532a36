"""Probe: the spread of noise on MACE's radial MLPs (``model.edge_noise``) on a trained BLIP-MACE model.

    OMP_NUM_THREADS=1 python docs/results/si-defects/mace/diagnosis/edge_noise_graft.py RUNS/run/blip/model.pt

The model is rebuilt with ``edge_noise: true`` and given the trained weights (the radial MLPs keep
their names); every edge rate is set to 0.01 and every node rate to 1e-5, so the spread comes from
the radial MLPs alone. Prints, per test set of ``si/`` (12 structures; vacancies 8): mean raw force
spread, |predicted force|, |error| (eV/A), and the Spearman correlations of the spread with both.
"""

import copy
import sys

import ase.io
import numpy as np
import torch
from scipy.stats import spearmanr

import blip
from blip.build import build_potential

DATA = "../shared/data/si"


def graft_edge_noise(model) -> torch.nn.Module:
    """Rebuild ``model``'s network with ``edge_noise: true``, give it the trained weights (the new
    edge rate heads stay untrained), put it in ``model.members[0]`` and return it."""
    cfg = copy.deepcopy(model.config)
    cfg["model"]["edge_noise"] = True
    grafted = build_potential(cfg, model.summary)
    missing, unexpected = grafted.load_state_dict(model.members[0].state_dict(), strict=False)
    assert not unexpected and all("inference" in k for k in missing), (missing, unexpected)
    grafted.eval()
    model.members[0] = grafted
    return grafted


def main(path: str) -> None:
    model = blip.load(path)
    grafted = graft_edge_noise(model)
    original = grafted.inference.rate

    def rate(domain, slot, base, features, groups, update=False, training=False, memo=None, novelty=None):
        p = original(domain, slot, base, features, groups, update, training, memo=memo, novelty=novelty)
        return torch.full_like(p, 1e-5 if domain == "node" else 0.01)

    grafted.inference.rate = rate
    frames = ase.io.read(f"{DATA}/train.xyz", ":") + ase.io.read(f"{DATA}/test.xyz", ":")
    test = ase.io.read(f"{DATA}/test.xyz", ":")
    sets = {"bulk": [a for a in test if a.info.get("config_type") in ("AIMD-NVT", "Elastic")][:12],
            "vacancies": [a for a in frames if a.info.get("config_type") == "Vacancy"][:8],
            "surfaces": [a for a in frames if a.info.get("config_type") == "Surface"][:12]}
    for name, structures in sets.items():
        sigma, force, error = [], [], []
        for atoms in structures:
            out = model.predict([atoms], samples=8, seed=0)
            sigma.append(np.linalg.norm(out["forces_std"][0], axis=1))
            force.append(np.linalg.norm(out["forces"][0], axis=1))
            error.append(np.linalg.norm(out["forces"][0] - atoms.get_forces(), axis=1))
        sigma, force, error = map(np.concatenate, (sigma, force, error))
        print(f"{name}: sigma {sigma.mean():.4f}  |F| {force.mean():.3f}  |err| {error.mean():.3f}  "
              f"Spearman(sigma, |F|) {spearmanr(sigma, force).statistic:.2f}, (sigma, |err|) "
              f"{spearmanr(sigma, error).statistic:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
