"""What the inference net's input path costs, before and after two exact savings, side by side.

    OMP_NUM_THREADS=1 python benchmarks/rate_inputs_cost.py [--repeats 5] [--backbones painn,mace,chgnet]

Variants, toggled in one process (interleaved repeats, medians):

* "before": every row whitened against every group's matrix (one (rows, d) x (d, G d) product,
  ``FeatureDensity.standardise``) and one whitening per noisy MLP;
* "split": the rows of a pass sorted by group once per noise domain and each group whitened by its
  own (d, d) matrix (``GroupSplit``, ``FeatureDensity.standardise_split``);
* "after" (the code as it is): "split", and the core and gate of a gated MLP (CHGNet), fed the same
  input tensor, share one whitening when their statistics agree (``InferenceNet.rate``'s memo).

All three give the same rates and energies (forces to float rounding). Models: the example configs of ``blip bench cost`` (untrained;
elements H, C, O, Si: 4 species, 16 groups per edge domain); systems: 8 acetylacetone molecules, and
for CHGNet also a 64-atom Si cell. Printed: predict with K = 16 (no MAP pass) over the MAP predict,
and one training step on acetylacetone (batch 8) over the deterministic step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blip.bayes.inference as inference
from blip import config as config_mod
from blip.bayes.density import FeatureDensity
from blip.bench import cost
from blip.train.datasets import prepare_data
from blip.train.loop import GraphSet, Trainer, _sizes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VARIANTS = {  # name -> (whitening, twin lookup)
    "before": (lambda self, x, split: self.standardise(x, split.index), lambda *args: None),
    "split": (FeatureDensity.standardise_split, lambda *args: None),
    "after": (FeatureDensity.standardise_split, inference._twin),
}


def use(variant: str) -> None:
    FeatureDensity.standardise_split, inference._twin = VARIANTS[variant]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def predict_model(backbone: str, system: str):
    """A BLIP model (example config, untrained) with feature statistics fitted on ``system``."""
    model = cost.build_models(cost.MODELS[backbone], False)["blip"]
    structures = cost.systems(False)[system]
    cost.fit_statistics(model, structures)
    return model, structures


def predict_ratios(backbone: str, system: str, repeats: int) -> dict[str, float]:
    model, structures = predict_model(backbone, system)
    ratios = {v: [] for v in VARIANTS}
    model.predict(structures, samples=2, seed=0, map_pass=False)
    order = list(VARIANTS)
    for rep in range(repeats):
        for name in order[rep % 3:] + order[:rep % 3]:
            use(name)
            base = _seconds(lambda: model.predict(structures, samples=0))
            ratios[name].append(_seconds(lambda: model.predict(structures, samples=16, seed=0, map_pass=False)) / base)
    use("after")
    return {k: statistics.median(v) for k, v in ratios.items()}


def _trainer(backbone: str, method: str, tmp: str):
    batch_size = 8
    cfg = config_mod.resolve({
        "data": {"train_file": str(EXAMPLES / "acac" / "train_300K.xyz"), "max_train": 4 * batch_size,
                 "valid_fraction": 0.1, "e0s": str(EXAMPLES / "acac" / "isolated_atoms.xyz")},
        "model": dict(cost.MODELS[backbone]), "uq": {"method": method},
        "training": {"batch_size": batch_size, "seed": 0}, "output_dir": tmp})
    trainer, data = Trainer(cfg, progress=False), prepare_data(cfg)
    train_set, sizes = GraphSet(data.train, float(cfg["model"]["cutoff"])), _sizes(data.train)
    net, opt, ema = trainer._new_member(data, 0)
    rng = np.random.default_rng(0)
    trainer._train_epoch(net, opt, ema, train_set, sizes, rng)  # warm-up, graphs built
    steps = -(-len(train_set) // batch_size)
    return lambda epoch: trainer._train_epoch(net, opt, ema, train_set, sizes, rng, epoch=epoch), steps


def train_ratios(backbone: str, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        plain, steps = _trainer(backbone, "deterministic", tmp)
        blip, _ = _trainer(backbone, "blip", tmp)
        times = {"deterministic": [], **{v: [] for v in VARIANTS}}
        order = list(times)
        for rep in range(repeats):
            for name in order[rep % 4:] + order[:rep % 4]:
                use("after" if name == "deterministic" else name)
                times[name].append(_seconds(lambda: (plain if name == "deterministic" else blip)(rep + 1)) / steps)
        use("after")
    base = statistics.median(times["deterministic"])
    return {k: statistics.median(times[k]) / base for k in VARIANTS}


def _line(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="painn,mace,chgnet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for backbone in args.backbones.split(","):
        for system in (("acac", "Si64") if backbone == "chgnet" else ("acac",)):
            print(f"{backbone} {system}: predict K = 16 / MAP: {_line(predict_ratios(backbone, system, args.repeats))}",
                  flush=True)
        train = train_ratios(backbone, args.repeats)
        print(f"{backbone} acac: training step / deterministic: {_line(train)}", flush=True)


if __name__ == "__main__":
    main()
