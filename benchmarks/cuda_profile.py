"""Where a sampled predict's time goes on a GPU: kernels launched, host synchronisations, busy time.

    python benchmarks/cuda_profile.py [--backbone painn] [--samples 16] [--device cuda]

Profiles (torch.profiler) one MAP predict and one K-sample predict of an untrained BLIP model
(the example config's size) on 8 acetylacetone molecules and prints, for each: wall time [ms],
number of device kernels, summed device-kernel time [ms], host-device copies and synchronisations,
and the host operations with the most self time. A launch-bound predict shows kernel time far below
wall time; each synchronisation stalls the host until the device queue drains.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from blip.bench import cost

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::_local_scalar_dense",
               "aten::nonzero", "aten::item")


def summarise(prof, wall: float) -> dict:
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    counts = {name: sum(e.count for e in events if e.key == name) for name in SYNC_EVENTS}
    return {"wall_ms": 1000 * wall, "kernels": len(kernels),
            "kernel_ms": sum(e.device_time for e in kernels) / 1000 if kernels else 0.0, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="painn")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model, acac = cost.acac_blip_model(args.backbone)
    model.to(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for k in (0, args.samples):
        for _ in range(3):  # warm-up
            model.predict(acac, samples=k, seed=0)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model.predict(acac, samples=k, seed=0)
            wall = time.perf_counter() - start
        print(f"== {args.backbone} K={k}: {summarise(prof, wall)}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


if __name__ == "__main__":
    main()
