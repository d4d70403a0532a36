"""Data-parallel throughput (1 vs 2 CPU processes, gloo) and peak memory of streamed vs in-memory data.

    python benchmarks/ddp_throughput.py [--data ../shared/data] [--structures 64] [--epochs 2]

Throughput: a small BLIP-PaiNN trained on the first ``--structures`` ethanol structures (global
batch 8), timed over the epochs after the first; structures/s for 1 and 2 processes and the
ratio. Memory: peak resident set size (``resource.getrusage``, each measurement in a fresh
process) of reading the training set and building every graph once, in memory (the default
path) and streamed from HDF5 shards (``blip preprocess``), for the ethanol and Si sets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip import config  # noqa: E402


def _cfg(train_file, out, n, epochs, e0s=None):
    return config.resolve({
        "data": {"train_file": str(train_file), "max_train": n, "valid_fraction": 0.05, "e0s": str(e0s) if e0s else "average"},
        "model": {"backbone": "painn", "features": 32, "interactions": 2, "radial": 8},
        "training": {"epochs": epochs, "batch_size": 8, "tensorboard": False, "patience": 100},
        "uq": {"recalibrate": False},
        "output_dir": str(out),
    })


def _train(rank, world, port, cfg, result):
    from blip.train.loop import Trainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    trainer = Trainer(cfg, progress=False)
    epoch_times = []
    original = Trainer._train_epoch

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        out = original(self, *a, **k)
        epoch_times.append(time.perf_counter() - t0)
        return out

    Trainer._train_epoch = timed
    trainer.run()
    if rank == 0:
        Path(result).write_text(json.dumps(epoch_times))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(train_file, n, epochs, world, tmp, e0s=None):
    cfg = _cfg(train_file, Path(tmp) / f"w{world}", n, epochs, e0s)
    result = Path(tmp) / f"times{world}.json"
    if world == 1:
        _train(0, 1, 0, cfg, str(result))
    else:
        mp.spawn(_train, args=(world, _free_port(), cfg, str(result)), nprocs=world, join=True)
    times = json.loads(result.read_text())[1:]  # the first epoch builds the graphs
    n_train = int(n)
    return n_train * len(times) / sum(times)


def _memory_child(train_file, mode, tmp, e0s):
    """In a fresh process: read the training set and build every graph once; print peak RSS (MiB)."""
    from blip.train.datasets import prepare_data, preprocess
    from blip.train.loop import GraphSet

    cfg = _cfg(train_file, Path(tmp) / "mem", None, 1, e0s)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # interpreter, torch, blip
    if mode == "stream":
        ds = Path(tmp) / "ds"
        if not (ds / "header.json").exists():
            subprocess.run([sys.executable, "-c", "import sys; from blip import config; from blip.train.datasets "
                            "import preprocess; preprocess(config.resolve(__import__('json').loads(sys.argv[1])), "
                            "sys.argv[2], shard_size=256)", json.dumps(cfg), str(ds)], check=True, cwd=ROOT)
        cfg["data"]["train_file"] = str(ds)
    data = prepare_data(cfg)
    graphs = GraphSet(data.train, float(cfg["model"]["cutoff"]))
    edges = sum(int(graphs[i]["n_edges"][0]) for i in range(len(graphs)))
    if mode == "memory":  # the in-memory trainer keeps every graph
        assert len(graphs.cache) == len(graphs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"peak_mib": peak, "above_imports_mib": peak - base, "n": len(graphs), "edges": edges}))


def memory(train_file, mode, tmp, e0s=None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(train_file), mode, str(tmp), str(e0s or "")],
                         check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        _memory_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] or None)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--structures", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--memory-only", action="store_true")
    args = p.parse_args()
    data = Path(args.data)
    ethanol, si = data / "ethanol" / "train.xyz", data / "si" / "train.xyz"
    e0s = data / "ethanol" / "isolated_atoms.xyz"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        one = None if args.memory_only else throughput(ethanol, args.structures, args.epochs, 1, tmp, e0s)
        two = None if args.memory_only else throughput(ethanol, args.structures, args.epochs, 2, tmp, e0s)
        print() if args.memory_only else print(f"throughput (ethanol, {args.structures} structures, global batch 8, float32 PaiNN-32, CPU, "
              f"{os.cpu_count()} cores): 1 process {one:.1f} structures/s, 2 processes {two:.1f} structures/s, "
              f"ratio {two / one:.2f}")
        for name, path, e in (("ethanol", ethanol, e0s), ("si", si, None)):
            sub = Path(tmp) / name
            sub.mkdir()
            mem, stream = memory(path, "memory", sub, e), memory(path, "stream", sub, e)
            print(f"peak memory ({name}, {mem['n']} training structures, {mem['edges']} edges): in memory "
                  f"{mem['peak_mib']:.0f} MiB (+{mem['above_imports_mib']:.1f} over the imports), streamed from HDF5 "
                  f"{stream['peak_mib']:.0f} MiB (+{stream['above_imports_mib']:.1f})")


if __name__ == "__main__":
    main()
