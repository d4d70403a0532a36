"""Probe: MACE's radial MLPs (conv_tp_weights) computed once per structure and shared by the K replicas (blip.backbones.base.shared_per_edge, exact gradients); patches the model in memory.

Record of docs/results/cost/README.md (2026-12-05); usage and output in outputs.txt. OMP_NUM_THREADS=1."""
import sys, time, statistics, types
import torch
from blip.allocator import keep_freed_memory; keep_freed_memory()
from blip.bench.cost import acac_blip_model, _seconds
from blip.backbones.base import edge_vectors, shared_per_edge

model, acac = acac_blip_model("mace")
bb = model.members[0].backbone
mm = bb.model
SHARED = {}

def shared_terms(batch):
    with torch.no_grad():
        l = torch.linalg.norm(edge_vectors(batch), dim=1)
        onehot = bb.species.one_hot(batch["numbers"], l.dtype)
        vals, ders = [], []
        for inter in mm.interactions:
            def f(x):
                feats, _ = mm.radial_embedding(x[:, None], onehot, batch["edge_index"], mm.atomic_numbers)
                return inter.conv_tp_weights(feats)
            v, d = torch.func.jvp(f, (l,), (torch.ones_like(l),))
            vals.append(v); ders.append(d)
    return {"shared_tp_weights": (vals, ders)}

orig_energy = bb.energy
def energy(batch):
    shared = batch.get("shared_tp_weights")
    if shared is None:
        return orig_energy(batch)
    l = torch.linalg.norm(edge_vectors(batch), dim=1)
    for inter, v, d in zip(mm.interactions, *shared):
        SHARED[id(inter.conv_tp_weights)] = shared_per_edge(l, v, d)
    try:
        return orig_energy(batch)
    finally:
        SHARED.clear()
for inter in mm.interactions:
    mod = inter.conv_tp_weights
    orig = mod.forward
    def fwd(x, _orig=orig, _id=id(mod)):
        s = SHARED.get(_id)
        return _orig(x) if s is None else s
    mod.forward = fwd

def on():
    bb.shared_terms = shared_terms; bb.energy = energy
def off():
    bb.shared_terms = lambda batch: None; bb.energy = orig_energy

# correctness
off(); a = model.predict(acac[:3], samples=4, seed=1)
on(); b = model.predict(acac[:3], samples=4, seed=1)
import numpy as np
for key in ("energy", "forces"):
    print(key, max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a[key + "_samples"] if key + "_samples" in a else a[key], b[key + "_samples"] if key + "_samples" in b else b[key])))
res = {}
for rep in range(int(sys.argv[1])):
    for name, fn in (("on", on), ("off", off)):
        fn()
        tm = _seconds(lambda: model.predict(acac, samples=0))
        for k in (4, 16):
            res.setdefault((name, k), []).append(_seconds(lambda: model.predict(acac, samples=k, seed=0)) / tm)
for name in ("on", "off"):
    r4 = statistics.median(res[(name, 4)]); r16 = statistics.median(res[(name, 16)])
    print(name, "K4 %.2f K16 %.2f slope %.3f" % (r4, r16, (r16 - r4) / 12))
