"""Training-step time of BLIP-MACE over deterministic MACE (same hyperparameters, same process).

One training step = forward with noise (BLIP) or without (deterministic), energy + forces
loss (+ beta * KL for BLIP), backward (double backward through the forces), gradient
clipping and an AdamW step; no EMA, no data loading inside the timed region. The two
models are timed in interleaved repetitions (order alternating) on the same batches, so
slow drifts of a shared machine hit both alike. Prints per-step medians and their ratio.

    python benchmarks/mace_step_time.py [--config examples/acac/mace.yaml] [--reps 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from blip import config as config_mod
from blip.build import build_potential, dtype_of
from blip.data import build_graph, collate
from blip.train.datasets import prepare_data
from blip.train.loss import data_loss

ROOT = Path(__file__).resolve().parent.parent


def make_step(model, cfg):
    """A closure running one optimiser step of ``model`` on a batch; returns the loss."""
    tcfg, uq = cfg["training"], cfg["uq"]
    opt = torch.optim.AdamW(model.parameters(), lr=float(tcfg["lr"]))
    beta = float(uq["beta"]) if model.method == "blip" else 0.0

    def step(batch):
        out = model(batch, sample=True, training=True)
        loss = data_loss(out, batch, tcfg["loss"], float(tcfg["energy_weight"]), float(tcfg["forces_weight"]))
        if "kl" in out:
            loss = loss + beta * out["kl"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
        opt.step()
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "acac" / "mace.yaml"))
    parser.add_argument("--reps", type=int, default=4, help="interleaved repetitions per model")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (TorchScript warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    cfg = config_mod.load(args.config, ["data.test_files={}"])
    data = prepare_data(cfg)
    cutoff, dtype, bs = float(cfg["model"]["cutoff"]), dtype_of(cfg), int(cfg["training"]["batch_size"])
    order = np.random.default_rng(0).permutation(len(data.train))
    n_batches = args.warmup + args.steps
    batches = [collate([build_graph(data.train[i].atoms, cutoff, i, data.train[i].energy, data.train[i].forces)
                        for i in order[k * bs:(k + 1) * bs]], dtype=dtype) for k in range(n_batches)]

    models, steps = {}, {}
    for method in ("deterministic", "blip"):
        c = copy.deepcopy(cfg)
        c["uq"]["method"] = method
        torch.manual_seed(int(cfg["training"]["seed"]))
        models[method] = build_potential(c, data.summary).train()
        steps[method] = make_step(models[method], c)
    for method, step in steps.items():
        for batch in batches[:args.warmup]:
            step(batch)

    times = {m: [] for m in steps}
    for rep in range(args.reps):
        for method in (("deterministic", "blip") if rep % 2 == 0 else ("blip", "deterministic")):
            for batch in batches[args.warmup:]:
                t0 = time.perf_counter()
                steps[method](batch)
                times[method].append(time.perf_counter() - t0)

    from blip.backbones.mace import hidden_irreps_of

    m = cfg["model"]
    params = {k: sum(p.numel() for p in v.backbone.parameters()) for k, v in models.items()}
    print(f"config {args.config}: hidden irreps {hidden_irreps_of(m)}, "
          f"correlation {m['correlation']}, {m['num_interactions']} interactions, max_ell {m['max_ell']}, "
          f"radial_mlp {m['radial_mlp']}, cutoff {cutoff} A, {cfg['model']['dtype']}, batch {bs} structures "
          f"({int(batches[-1]['n_atoms'].sum())} atoms, {int(batches[-1]['n_edges'].sum())} edges), "
          f"{torch.get_num_threads()} threads; backbone parameters {params['deterministic']}, "
          f"inference net {sum(p.numel() for p in models['blip'].inference.parameters())}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>13}: median {1e3 * med[k]:.1f} ms/step, min {1e3 * min(v):.1f}, max {1e3 * max(v):.1f} "
              f"({len(v)} steps)")
    print(f"ratio BLIP / deterministic training-step time: {med['blip'] / med['deterministic']:.2f} (medians), "
          f"{min(times['blip']) / min(times['deterministic']):.2f} (minima)")


if __name__ == "__main__":
    main()
