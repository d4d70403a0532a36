"""Probe (rejected): per-edge noise on MACE's radial MLPs whose rates are the receiving atom's node rates.

    OMP_NUM_THREADS=1 python edge_noise_receiver_rates.py RUNS/run/blip/model.pt MODE [--data DIR]

MODE ``own``: the trained model as it is (noise on node layers, draws shared per structure);
``edge``: the model rebuilt with ``edge_noise: true`` and its trained weights, node noise off
(rates 1e-5), each edge row of the radial MLPs drawn independently (its own identity) with the rate
of its receiving atom: the mean over the node layers of that atom's rates in a first pass. Per set
of ``blip bench si-defects`` (seed 0 split; 14 validation, 12 test structures each), K = 8: mean
per-atom force spread and error (eV/A), by coordination 3 / 4 (bonds within 2.75 A), and the force
NLL, coverage and Spearman(sigma, |error|) per component after one factor (and blip's floor) fitted on
the validation structures (no widening).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from ase.neighborlist import neighbor_list
from scipy.stats import spearmanr

import blip
from blip.bench.protocols import Options, build_plan, data_dir

sys.path.insert(0, str(Path(__file__).parent))
from edge_noise_graft import graft_edge_noise  # noqa: E402


class ReceiverRates:
    """Replaces the inference net's rates: node rates recorded (and, in ``edge`` mode, switched off),
    edge rates taken from the receiving atom's recorded mean node rate."""

    def __init__(self, potential, mode: str):
        self.inference, self.mode = potential.inference, mode
        self.original, self.node_rates, self.recording, self.atom_rate, self.batch = \
            potential.inference.rate, {}, False, None, None
        potential.inference.rate = self.rate
        backbone_inputs = potential.backbone.mace_inputs

        def mace_inputs(batch):
            self.batch = batch
            return backbone_inputs(batch)

        potential.backbone.mace_inputs = mace_inputs

    def rate(self, domain, slot, base, features, groups, update=False, training=False, memo=None, novelty=None):
        if domain == "node":
            p = self.original(domain, slot, base, features, groups, update, training, memo=memo, novelty=novelty)
            if self.recording:
                self.node_rates[slot] = p.detach()
            return p if self.mode == "own" else torch.full_like(p, 1e-5)
        if self.atom_rate is None:
            return torch.full((base.shape[0],), 1e-5, dtype=base.dtype, device=base.device)
        receiver = self.batch["edge_index"][1] % self.atom_rate.shape[0]  # replicas are blocks of the structure
        return self.atom_rate[receiver].clamp(1e-5, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("mode", choices=("own", "edge"))
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = blip.load(a.model)
    if a.mode == "edge":
        graft_edge_noise(model).shared_draws = False
    probe = ReceiverRates(model.members[0], a.mode)
    exp = build_plan("si-defects", data_dir(a.data), Options(seed=0)).experiments[0]
    sets = {"validation": list(exp.valid)[:14]} | {t.name: list(t.structures)[:12] for t in exp.tests}
    results = {}
    for name, structures in sets.items():
        sigma, error, coordination = [], [], []
        for s in structures:
            if a.mode == "edge":
                probe.recording, probe.atom_rate = True, None
                model.predict([s.atoms], samples=8, seed=0)
                n = len(s.atoms)
                probe.atom_rate = torch.stack([p.reshape(-1, n).mean(0) for p in probe.node_rates.values()]).mean(0)
                probe.recording = False
            out = model.predict([s.atoms], samples=8, seed=0)
            sigma.append(out["forces_std"][0])
            error.append(out["forces"][0] - s.forces)
            coordination.append(np.bincount(neighbor_list("i", s.atoms, 2.75), minlength=len(s.atoms)))
        results[name] = tuple(map(np.concatenate, (sigma, error, coordination)))
    s_v, e_v, _ = results["validation"]
    floor = 0.01 * float(np.sqrt((e_v ** 2).mean()))

    def nll(s, e, k):
        v = (k * s) ** 2 + floor ** 2
        return float(np.mean(0.5 * np.log(2 * np.pi * v) + e ** 2 / (2 * v)))

    grid = np.exp(np.linspace(-5, 6, 400))
    k = grid[np.argmin([nll(s_v, e_v, x) for x in grid])]
    print(f"{a.model} ({a.mode}): factor {k:.3g}")
    for name, (s, e, c) in results.items():
        sa, ea = np.linalg.norm(s, axis=1), np.linalg.norm(e, axis=1)
        cov = float(np.mean(np.abs(e) <= 1.96 * np.sqrt((k * s) ** 2 + floor ** 2)))
        by = "  ".join(f"{cc}-coordinated {sa[c == cc].mean():.4f} / {ea[c == cc].mean():.3f}"
                       for cc in (3, 4) if (c == cc).any())
        print(f"  {name:18s} sigma {sa.mean():.4f} |err| {ea.mean():.3f} NLL {nll(s, e, k):6.2f} coverage {cov:.2f} "
              f"Spearman {spearmanr(np.abs(e).ravel(), s.ravel()).statistic:.2f}  {by}")


if __name__ == "__main__":
    main()
