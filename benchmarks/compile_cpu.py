"""Does ``torch.compile`` help BLIP on a CPU? The counter-based draws, and optionally the whole energy.

    OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py [--energy]

Part 1: the normal draws of one noisy layer (``blip.bayes.noise.counter_normal``: integer hash,
Box-Muller) written as plain out-of-place tensor code (the same numbers as the library's
in-place kernels, checked) and compiled by inductor (``dynamic=True, fullgraph=True``), against
the library's eager kernels, for 120 rows (a training batch of 8 acetylacetone), 1,920 (K = 16
replicas of it) and 16,000 rows; 64 and 128 channels. Prints microseconds per call (best of 5
blocks) and the largest difference of the compiled draws.
Part 2 (``--energy``): compiles ``backbone.energy`` of the example BLIP-PaiNN (untrained,
``dynamic=True``) and runs predict with K = 0 and 16 on 8 acetylacetone molecules: prints the
times against eager, or the error that stopped the compilation.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from blip.bayes import noise


def _mix(x: torch.Tensor) -> torch.Tensor:
    """``noise.mix32`` out of place (the same bits)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * noise._MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * noise._MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32).add(0.5).mul(2.0 ** -24)


def normals(keys: torch.Tensor, column: torch.Tensor, channels: int) -> torch.Tensor:
    """``noise.counter_normal`` in float32 (rows, channels), out of place."""
    bits = _mix(keys[:, None] ^ column[None, :])
    radius = _unit(bits).log().mul(-2.0).sqrt()
    angle = _unit(_mix(bits ^ noise._GOLDEN)).mul(2.0 * math.pi)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :channels]


def _microseconds(fn, calls: int = 30) -> float:
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def draws() -> None:
    compiled = torch.compile(normals, dynamic=True, fullgraph=True)
    stream = noise.stream_word("node", 0)
    print("normal draws of one layer, float32 [us per call]:")
    for rows, channels in ((120, 64), (1920, 64), (1920, 128), (16000, 64)):
        keys = noise.mix32(torch.arange(rows, dtype=torch.int32) * 7 + 3)
        column = noise.column_hashes(stream, (channels + 1) // 2, keys.device)
        eager = noise.counter_normal(keys, stream, channels, torch.float32, column)
        assert torch.equal(normals(keys, column, channels), eager)
        diff = float((compiled(keys, column, channels) - eager).abs().max())
        t_eager = _microseconds(lambda: noise.counter_normal(keys, stream, channels, torch.float32, column))
        t_compiled = _microseconds(lambda: compiled(keys, column, channels))
        print(f"  {rows:6d} rows x {channels:3d}: eager {t_eager:7.0f}, compiled {t_compiled:7.0f} "
              f"({t_compiled / t_eager:.2f}x), largest difference {diff:.1e}")


def energy() -> None:
    from blip.bench.cost import acac_blip_model

    model, acac = acac_blip_model("painn")

    def best_ms(samples: int) -> float:
        return _microseconds(lambda: model.predict(acac, samples=samples, seed=0), calls=1) / 1000

    eager = {k: best_ms(k) for k in (0, 16)}
    print(f"predict, eager: K = 0 {eager[0]:.1f} ms, K = 16 {eager[16]:.1f} ms")
    for member in model.members:
        member.backbone.energy = torch.compile(member.backbone.energy, dynamic=True)
    start = time.perf_counter()
    try:
        for k in (0, 16):
            model.predict(acac, samples=k, seed=0)
    except Exception as error:  # report what stopped the compiler, whatever it is
        print(f"compiling backbone.energy failed after {time.perf_counter() - start:.0f} s: "
              f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return
    print(f"compiled in {time.perf_counter() - start:.0f} s; predict: "
          + ", ".join(f"K = {k} {best_ms(k):.1f} ms (eager {eager[k]:.1f})" for k in (0, 16)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--energy", action="store_true", help="also try compiling the whole energy (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    draws()
    if args.energy:
        energy()


if __name__ == "__main__":
    main()
