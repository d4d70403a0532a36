"""Where a crystal model's force spread goes: by test set and by coordination number.

    OMP_NUM_THREADS=1 python benchmarks/spread_by_coordination.py MODEL.pt [MODEL.pt ...] \
        [--data ../shared/data] [--rate P [--layer SLOT]] [--row-draws] [--structures 12]

For models trained on bulk silicon (``blip bench si-defects --runs-dir RUNS``:
RUNS/run/METHOD/model.pt; rates and distances for BLIP models only). On the bulk test structures
and the held-out vacancy and surface groups of ``si/``, per atom: the raw force spread (norm of the
per-component standard deviation, eV/A, K = 8 samples, seed 0, no recalibration), the norm of the
predicted force and of its error, the mean dropout rate of the noisy node layers, and their log
feature distance (the model's own metric), averaged by set and by the number of neighbours within
2.75 A; per set also the Spearman rank correlation of the spread with the predicted force and with
the error, and (BLIP) of the log feature distance with the error.

``--rate P`` replaces every node rate by P (edge rates by 1e-5): the spread the noise can reach at
equal rates, which separates "the rates do not rise" from "the same rates give less spread here";
with ``--layer SLOT`` only that node layer (its slot) gets P, every other one 1e-5.
``--row-draws``: independent draws per atom instead of one perturbed network per structure.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from ase.neighborlist import neighbor_list
from scipy.stats import spearmanr

import blip
from blip.bayes.density import GroupSplit
from blip.bench.protocols import Options, build_plan, data_dir

BOND_CUTOFF = 2.75  # A: first neighbours of silicon (bond 2.35 A, second shell 3.84 A)


def test_sets(data: Path, n: int) -> dict[str, list]:
    """Test set name -> its first ``n`` structures (:class:`blip.data.Structure`), as ``blip bench
    si-defects`` splits ``data``/si: bulk of test.xyz (in distribution), vacancies, surfaces."""
    experiment = build_plan("si-defects", data, Options(seed=0)).experiments[0]
    return {test.name: test.structures[:n] for test in experiment.tests}


class RateProbe:
    """Wraps the model's ``inference.rate``: records each node layer's rates and log feature distance
    per row, or replaces the rates by a constant."""

    def __init__(self, model, constant: float | None, layer: int | None = None):
        self.inference = model.members[0].inference
        self.original, self.constant, self.layer, self.calls = self.inference.rate, constant, layer, []
        self.inference.rate = self.rate

    def rate(self, domain, slot, base, features, groups, update=False, training=False, memo=None, novelty=None):
        p = self.original(domain, slot, base, features, groups, update, training, memo=memo, novelty=novelty)
        if self.constant is not None:
            chosen = domain == "node" and self.layer in (None, slot)
            p = torch.full_like(p, self.constant if chosen else 1e-5)
        if domain == "node":
            self.calls.append((slot, p.detach().double(), self.distance(domain, slot, features, groups)))
        return p

    def distance(self, domain, slot, features, groups) -> torch.Tensor:
        """log m (rows,): the squared feature distance the rate head of this layer sees."""
        inf, density = self.inference, self.inference.densities[domain][str(slot)]
        with torch.no_grad():
            if groups is None:  # one group, as InferenceNet.rate reads it
                groups = features.new_zeros(features.shape[0], dtype=torch.long)
            split = groups if isinstance(groups, GroupSplit) else GroupSplit.of(groups, density.groups)
            if inf.metric == "nearest":
                m = density.nearest_split(features, split)
            else:
                centred = density.centred(features, split.index)
                z = density.standardise_split(features, split, centred)
                m = density.distances(features, split.index, z, inf.metric, centred)
        if m.dim() > 1:  # metric "both": the mean of the two distances' logs
            return torch.log(m.double().clamp_min(1e-12)).mean(dim=1)
        return torch.log(m.double().clamp_min(1e-12))

    def per_atom(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean rate and mean log distance over the node layers and passes of one structure, (n,) each."""
        rates = [p.reshape(-1, n).mean(0) for _, p, _ in self.calls if p.numel() % n == 0]
        dist = [d.reshape(-1, n).mean(0) for _, _, d in self.calls if d.numel() % n == 0]
        self.calls.clear()
        return torch.stack(rates).mean(0).numpy(), torch.stack(dist).mean(0).numpy()


def table(model, probe: RateProbe | None, frames: list) -> dict[str, np.ndarray]:
    columns = {k: [] for k in ("sigma", "force", "error", "rate", "log_distance", "coordination")}
    for structure in frames:
        atoms = structure.atoms
        out = model.predict([atoms], samples=8, seed=0)
        n = len(atoms)
        rate, dist = probe.per_atom(n) if probe is not None else (np.full(n, np.nan), np.full(n, np.nan))
        columns["sigma"].append(np.linalg.norm(out["forces_std"][0], axis=1))
        columns["force"].append(np.linalg.norm(out["forces"][0], axis=1))
        columns["error"].append(np.linalg.norm(out["forces"][0] - structure.forces, axis=1))
        columns["rate"].append(rate)
        columns["log_distance"].append(dist)
        columns["coordination"].append(np.bincount(neighbor_list("i", atoms, BOND_CUTOFF), minlength=n))
    return {k: np.concatenate(v) for k, v in columns.items()}


def line(label: str, t: dict, sel) -> str:
    return (f"  {label:<26} {int(sel.sum()):5d} {t['sigma'][sel].mean():9.4f} {t['force'][sel].mean():8.3f} "
            f"{t['error'][sel].mean():8.3f} {t['rate'][sel].mean():9.5f} {t['log_distance'][sel].mean():9.2f}")


def report(path: str, data: Path, rate: float | None, layer: int | None, row_draws: bool, n: int) -> None:
    model = blip.load(path)
    blip_model = model.members[0].inference is not None
    if layer is not None and rate is None:
        raise SystemExit("--layer needs --rate")
    if (rate is not None or row_draws) and not blip_model:
        raise SystemExit(f"{path}: --rate and --row-draws need a BLIP model")
    if row_draws:
        model.members[0].shared_draws = False
    probe = RateProbe(model, rate, layer) if blip_model else None
    kind = f"metric {probe.inference.metric}" if blip_model else model.config["uq"]["method"]
    if rate is not None:
        kind += f", node rate {rate} in " + ("every layer" if layer is None else f"slot {layer} only")
    print(f"{path} ({model.config['model']['backbone']}, {kind}{', draws per atom' if row_draws else ''})")
    print(f"  {'set / coordination':<26} {'atoms':>5} {'sigma_F':>9} {'|F|':>8} {'|err|':>8} {'rate':>9} "
          f"{'log dist':>9}")
    for name, frames in test_sets(data, n).items():
        t = table(model, probe, frames)
        print(line(name, t, np.ones_like(t["sigma"], dtype=bool))
              + f"   Spearman(sigma, |F|) {spearmanr(t['sigma'], t['force']).statistic:.2f},"
              f" (sigma, |err|) {spearmanr(t['sigma'], t['error']).statistic:.2f}"
              + (f", (log dist, |err|) {spearmanr(t['log_distance'], t['error']).statistic:.2f}" if probe else ""))
        for c in sorted(set(t["coordination"])):
            sel = t["coordination"] == c
            if sel.sum() >= 3:
                print(line(f"  {c} neighbours", t, sel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=None, help="folder with si/ (as blip bench --data)")
    parser.add_argument("--rate", type=float, default=None, help="every node rate set to this value")
    parser.add_argument("--layer", type=int, default=None, help="with --rate: only this node slot")
    parser.add_argument("--row-draws", action="store_true", help="independent draws per atom")
    parser.add_argument("--structures", type=int, default=12, help="per test set")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for path in args.models:
        report(path, data_dir(args.data), args.rate, args.layer, args.row_draws, args.structures)


if __name__ == "__main__":
    main()
