"""What independent noise on MACE's 0e -> 0e weights costs in predict, side by side with noise shared
per input channel (``uq.weight_noise: independent`` against ``per_input``).

    OMP_NUM_THREADS=1 python benchmarks/mace_weight_noise_cost.py [--repeats 7]

BLIP-MACE of the example config (untrained, feature statistics fitted on the timed structures, as
if trained on periodic cells), 8 acetylacetone molecules and a 64-atom silicon cell; K = 4 and 16
samples, each timing over the MAP predict just before it (the MAP pass is the same either way),
median of interleaved repeats, and the per-sample slope between them. Training step:
``blip.bench.cost.train_step_ratios`` on batches of 8 acetylacetone molecules, the deterministic MACE
and BLIP-MACE with either kind of noise.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from blip import config as config_mod
from blip.backbones.base import DatasetSummary
from blip.bench import cost
from blip.build import build_potential
from blip.predictor import BlipModel

KINDS = ("per_input", "independent")


def mace_model(weight_noise: str) -> BlipModel:
    cfg = config_mod.resolve({"model": dict(cost.MODELS["mace"]),
                              "uq": {"method": "blip", "samples": 16, "weight_noise": weight_noise}})
    summary = DatasetSummary(elements=cost.ELEMENTS, periodic=True)
    torch.manual_seed(0)
    member = build_potential(cfg, summary)
    return BlipModel([member], cfg, summary, calibration=cost.default_calibration(cfg, member))


def training(repeats: int) -> None:
    variants = {"deterministic": ("deterministic", {})}
    variants.update({f"blip, {kind}": ("blip", {"weight_noise": kind}) for kind in KINDS})
    rows = cost.train_step_ratios(cost.MODELS["mace"], repeats, 8, 8, variants=variants)
    print(f"training step, acac batch 8, {repeats} interleaved repeats of one epoch:")
    for r in rows:
        print(f"  {r['method']:22s} {r['seconds_per_step'] * 1000:6.1f} ms   median ratio {r['ratio']:.3f}"
              f"   min ratio {r['ratio_min']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    systems = cost.systems(False)
    for name in ("acac", "Si64"):
        structures = systems[name]
        models = {kind: mace_model(kind) for kind in KINDS}
        for model in models.values():
            cost.fit_statistics(model, structures)
            model.predict(structures, samples=2, seed=0)  # warm-up
        configs = [(kind, k) for kind in KINDS for k in (4, 16)]
        ratios = cost.paired_ratios(configs, lambda c: models[c[0]].predict(structures, samples=0, seed=0),
                                    lambda c: models[c[0]].predict(structures, samples=c[1], seed=0), args.repeats)
        print(f"{name}: predict over the MAP predict, {args.repeats} interleaved repeats, median (min):")
        for kind in KINDS:
            k4, k16 = (statistics.median(ratios[(kind, k)]) for k in (4, 16))
            print(f"  {kind:11s} K = 4: {k4:6.2f} ({min(ratios[(kind, 4)]):.2f})   K = 16: {k16:6.2f} "
                  f"({min(ratios[(kind, 16)]):.2f})   per sample {(k16 - k4) / 12:.2f}")
    training(args.repeats)


if __name__ == "__main__":
    main()
