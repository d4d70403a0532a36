"""max(0.1, fitted b) against b = 0.1 from the per-seed outputs of the fixed-b rescoring (no hinge):
    python floor_from_published.py ../fixed-b/*.txt ../../../../finetune-si/novelty-widening/fixed-b.txt
"""
import re, sys, collections
import numpy as np
pat = re.compile(r"seed (\d+) (\S+)\s+widening (\S+)\s+NLL\s+(\S+) cov (\S+) .*? b (\S+)")
for path in sys.argv[1:]:
    rows = collections.defaultdict(dict)
    for line in open(path):
        m = pat.search(line)
        if m:
            seed, tset, w, nll, cov, b = m.groups()
            rows[(seed, tset)][w] = (float(nll), float(cov), float(b))
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for (seed, tset), d in rows.items():
        if "True" not in d or "b=0.1" not in d:
            continue
        fit = d["True"]
        floor = fit if fit[2] >= 0.1 else d["b=0.1"]
        for name, r in (("b=0.1", d["b=0.1"]), ("fit", fit), ("max(0.1,fit)", floor)):
            out[tset][name].append(r)
    print(path.split("results/")[-1])
    for tset, d in sorted(out.items()):
        bs = [r[2] for r in d["fit"]]
        print(f"  {tset:20s} " + "  ".join(f"{n} {np.mean([r[0] for r in v]):7.3f} ({np.mean([r[1] for r in v]):.2f})" for n, v in d.items())
              + "  fitted b " + ",".join(f"{b:.2f}" for b in bs))
