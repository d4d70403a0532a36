"""How large a BLIP model's energy sigma can get on a structure: the trained rates against every rate at its cap.

    OMP_NUM_THREADS=1 python benchmarks/noise_capacity.py MODEL.pt [MODEL.pt ...] \
        [--xyz ../shared/data/ethanol/test_H_removal.xyz] [--frames 8] [--samples 16]

For frames spread along a labelled path (default: ethanol's O-H removal), per BLIP model: the
energy error of the noise-free pass (eV), the energy sigma of K samples with the trained rates
and with every rate of every noisy layer set to the cap ``uq.p_max`` (eV, raw: no calibration
factor), and the largest and the median node rate. Each frame is named by the distance from the
atom that moves most along the path (first to last frame) to its nearest neighbour (for the O-H
path: the H's distance to the O until it passes other atoms). A sigma that stays far below the
error even at the cap means the noise's placement, not the rates, limits the spread there.
"""

from __future__ import annotations

import argparse

import ase.io
import numpy as np
import torch

import blip
from blip.data import build_graph, collate


def node_rates(model, atoms, seed: int) -> np.ndarray:
    """Trained rates (layers, atoms) of the node domain of one structure (first member)."""
    potential = model.members[0]
    batch = collate([build_graph(atoms, model.cutoff, index=0)], dtype=model.dtype)
    with torch.no_grad():
        rates = potential.rates(batch, seed=seed)
    return np.stack([p.detach().numpy() for (domain, _), p in rates.items() if domain == "node"])


def capped(model):
    """A context manager that sets every rate of every member to its cap ``p_max``."""
    class Capped:
        def __enter__(self):
            self.saved = [(m.inference, m.inference.rate) for m in model.members]
            for inference, rate in self.saved:
                inference.rate = lambda *a, _rate=rate, _cap=inference.p_max, **k: torch.full_like(_rate(*a, **k), _cap)

        def __exit__(self, *exc):
            for inference, rate in self.saved:
                inference.rate = rate
    return Capped()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--xyz", default="../shared/data/ethanol/test_H_removal.xyz")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = ase.io.read(args.xyz, ":")
    frames = [path[i] for i in np.linspace(0, len(path) - 1, args.frames).round().astype(int)]
    mover = int(np.argmax(np.linalg.norm(path[-1].positions - path[0].positions, axis=1)))
    for file in args.models:
        model = blip.load(file)
        if model.method != "blip":
            raise SystemExit(f"{file}: a {model.method} model; this probe needs BLIP rates")
        model.calibration = {"energy": 1.0, "forces": 1.0}
        print(f"{file} (p_max {model.members[0].inference.p_max})")
        for atoms in frames:
            distances = np.delete(atoms.get_distances(mover, range(len(atoms)), mic=True), mover)
            reference = atoms.get_potential_energy()
            trained = model.predict([atoms], samples=args.samples, seed=args.seed)
            with capped(model):
                at_cap = model.predict([atoms], samples=args.samples, seed=args.seed)
            rates = node_rates(model, atoms, args.seed)
            print(f"  atom {mover} ({atoms.get_chemical_symbols()[mover]}) {distances.min():5.2f} A from its nearest: "
                  f"|error E| {abs(float(trained['energy'][0]) - reference):7.3f} eV, "
                  f"sigma_E trained {float(trained['energy_std'][0]):7.3f}, at the cap {float(at_cap['energy_std'][0]):7.3f} eV; "
                  f"node rates max {rates.max():.3f}, median {np.median(rates):.4f}")


if __name__ == "__main__":
    main()
