"""How many operators (kernels) a predict dispatches, over the noise-free (MAP) predict: a timing-free
measure of the cost on a GPU, where passes of small structures are bound by kernel launches.

    OMP_NUM_THREADS=1 python benchmarks/predict_kernels.py [--backbone painn] [--samples 4,16]

For the untrained example models of ``blip bench cost`` (BLIP, MC dropout, the 5-member ensemble;
float32) on 8 acetylacetone molecules, ``predict`` runs on the CPU twice under a
``TorchDispatchMode`` that counts operators: with the CPU's settings, and with the settings a
CUDA model takes (``MAX_EDGES_PER_PASS_GPU`` replicas x rows per pass, ``BATCH_ELEMENTS_GPU``
draws per batch of kernels, the noise-free pass as one more replica of the sampled one:
``BlipModel.folds_map_pass``), read from the library. On a CPU time does not follow these counts
(passes of many rows are bound by memory and arithmetic); on a GPU the last measured time ratios
(docs/results/cost/README.md) were close to the counted ones.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

import blip.bayes.noise as noise
import blip.predictor as predictor
from blip.bench import cost

sys.path.insert(0, str(Path(__file__).parent))
from train_step_kernels import OperatorCount  # noqa: E402


@contextlib.contextmanager
def gpu_settings():
    """The predictor's and the noise draws' device-dependent settings as on a GPU, on the CPU."""
    with mock.patch.object(predictor, "MAX_EDGES_PER_PASS", predictor.MAX_EDGES_PER_PASS_GPU), \
            mock.patch.object(noise, "BATCH_ELEMENTS", noise.BATCH_ELEMENTS_GPU), \
            mock.patch.object(predictor.BlipModel, "folds_map_pass", property(lambda self: True)):
        yield


def operators(model, structures, samples: int) -> int:
    model.predict(structures, samples=samples, seed=0)  # warm-up: the noise plan, cached columns
    with OperatorCount() as counter:
        model.predict(structures, samples=samples, seed=0)
    return sum(counter.counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="painn", choices=sorted(cost.MODELS))
    parser.add_argument("--samples", default="4,16", help="comma-separated K")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in args.samples.split(",")]
    models = cost.build_models(cost.MODELS[args.backbone], False)
    structures = cost.systems(False)["acac"]
    for model in models.values():
        cost.fit_statistics(model, structures)
    print(f"{args.backbone}, 8 acetylacetone molecules: operators dispatched per predict (x the MAP predict's)")
    for name, settings in (("CPU settings", contextlib.nullcontext), ("GPU settings", gpu_settings)):
        with settings():
            base = operators(models["blip"], structures, 0)
            row = [f"MAP {base}"]
            for k in ks:
                for method in ("blip", "mc_dropout"):
                    n = operators(models[method], structures, k)
                    row.append(f"{method} K={k} {n} ({n / base:.2f}x)")
            n = operators(models["ensemble"], structures, 0)
            row.append(f"ensemble {n} ({n / base:.2f}x)")
        print(f"  {name}: " + ", ".join(row))


if __name__ == "__main__":
    main()
