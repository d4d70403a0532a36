"""Mean dropout rate per noisy node layer by coordination (neighbours within 2.8 A), first six
structures of each set: si_rates.py MODEL_CALIBRATED_PT SEED"""
import sys, numpy as np, torch
from ase.neighborlist import neighbor_list
import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.data import build_graph, collate
torch.set_num_threads(1)
path, seed = sys.argv[1], int(sys.argv[2])
plan = build_plan("si-defects", data_dir("/work/shared/data"), Options(seed=seed))
exp = plan.experiments[0]
model = blip.load(path)
m = model.members[0]
for t in [("valid", exp.valid)] + [(t.name, t.structures) for t in exp.tests]:
    name, structs = t
    coords, rates = [], {}
    for s in structs[:6]:
        g = build_graph(s.atoms, model.cutoff, index=0)
        b = collate([g], dtype=model.dtype)
        r = m.rates(b, seed=seed)
        coords.append(np.bincount(neighbor_list("i", s.atoms, 2.8), minlength=len(s.atoms)))
        for k, v in r.items():
            rates.setdefault(k, []).append(v.detach().numpy())
    coord = np.concatenate(coords)
    for k, v in rates.items():
        v = np.concatenate(v)
        if len(v) != len(coord):
            print(f"{name:18s} {k} rows {len(v)} mean p {v.mean():.4f} p90 {np.quantile(v, .9):.4f} max {v.max():.4f}")
            continue
        msg = " ".join(f"c{c}:{v[coord == c].mean():.4f}" for c in sorted(set(coord)) if (coord == c).sum() >= 3)
        print(f"{name:18s} {k} {msg}")
