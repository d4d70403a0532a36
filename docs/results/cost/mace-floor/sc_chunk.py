"""Probe: MACE's symmetric contractions evaluated in row chunks (exact; smaller intermediates); patches the model in memory.

Record of docs/results/cost/README.md (2026-12-05); usage and output in outputs.txt. OMP_NUM_THREADS=1."""
import sys, statistics, torch
from blip.allocator import keep_freed_memory; keep_freed_memory()
from blip.bench.cost import acac_blip_model, _seconds
import numpy as np
model, acac = acac_blip_model("mace")
mm = model.members[0].backbone.model
CH = {"n": 0}
for prod in mm.products:
    sc = prod.symmetric_contractions
    orig = sc.forward
    def fwd(x, y, _orig=orig):
        n = CH["n"]
        if n == 0 or x.shape[0] <= n:
            return _orig(x, y)
        return torch.cat([_orig(x[s:s + n], y[s:s + n]) for s in range(0, x.shape[0], n)])
    sc.forward = fwd
CH["n"] = 0; a = model.predict(acac[:3], samples=4, seed=1)
CH["n"] = 16; b = model.predict(acac[:3], samples=4, seed=1)
print("max force diff", max(float(np.abs(x - y).max()) for x, y in zip(a["forces_samples"], b["forces_samples"])))
sizes = [int(x) for x in sys.argv[1].split(",")]
res = {}
for rep in range(int(sys.argv[2])):
    for s in sizes:
        CH["n"] = 0
        tm = _seconds(lambda: model.predict(acac, samples=0))
        CH["n"] = s
        tm2 = _seconds(lambda: model.predict(acac, samples=0))
        res.setdefault((s, 0), []).append(tm2 / tm)
        for k in (4, 16):
            res.setdefault((s, k), []).append(_seconds(lambda: model.predict(acac, samples=k, seed=0)) / tm)
for s in sizes:
    r0 = statistics.median(res[(s, 0)]); r4 = statistics.median(res[(s, 4)]); r16 = statistics.median(res[(s, 16)])
    print(s, "MAPchunked %.2f K4 %.2f K16 %.2f slope %.3f" % (r0, r4, r16, (r16 - r4) / 12))
