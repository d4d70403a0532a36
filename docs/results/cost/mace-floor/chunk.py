"""BLIP predict's per-sample cost for several blip.predictor.MAX_EDGES_PER_PASS (replicas x (edges + atoms) per pass).

Record of docs/results/cost/README.md (2026-12-05); usage and output in outputs.txt. OMP_NUM_THREADS=1."""
import sys, statistics, torch
from blip.allocator import keep_freed_memory; keep_freed_memory()
import blip.predictor as P
from blip.bench.cost import acac_blip_model, _seconds
backbone = sys.argv[1]
model, acac = acac_blip_model(backbone)
sizes = [int(x) for x in sys.argv[2].split(",")]
res = {}
for rep in range(int(sys.argv[3])):
    for s in sizes:
        P.MAX_EDGES_PER_PASS = s
        tm = _seconds(lambda: model.predict(acac, samples=0))
        for k in (4, 16):
            res.setdefault((s, k), []).append(_seconds(lambda: model.predict(acac, samples=k, seed=0)) / tm)
for s in sizes:
    r4 = statistics.median(res[(s, 4)]); r16 = statistics.median(res[(s, 16)])
    print(s, "K4 %.2f K16 %.2f slope %.3f" % (r4, r16, (r16 - r4) / 12))
