"""Per-sample cost of BLIP-MACE predict with and without recording the feature distance (the default widenings' b or unit factors), alternated in one process.

Record of docs/results/cost/README.md (2026-12-05); usage and output in outputs.txt. OMP_NUM_THREADS=1."""
import time, statistics, sys
import torch
from blip.allocator import keep_freed_memory; keep_freed_memory()
from blip.bench.cost import acac_blip_model, default_calibration, _seconds
backbone = sys.argv[1] if len(sys.argv) > 1 else "mace"
model, acac = acac_blip_model(backbone)
cal_on = default_calibration(model.config, model.members[0])
cal_off = {"energy": 1.0, "forces": 1.0}
print(cal_on)
def t(cal, k):
    model.calibration = dict(cal)
    return _seconds(lambda: model.predict(acac, samples=k, seed=0))
for cal in (cal_on, cal_off):
    t(cal, 4)
res = {}
for rep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 6):
    for name, cal in (("on", cal_on), ("off", cal_off)):
        tm = t(cal_off, 0)
        for k in (4, 16):
            res.setdefault((name, k), []).append(t(cal, k) / tm)
for name in ("on", "off"):
    r4 = statistics.median(res[(name, 4)]); r16 = statistics.median(res[(name, 16)])
    print(name, "K4 %.2f K16 %.2f slope %.3f" % (r4, r16, (r16 - r4) / 12))
