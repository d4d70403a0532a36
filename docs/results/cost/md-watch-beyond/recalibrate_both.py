"""Recalibrate the energy-split acac seed 0 default model with and without uq.novelty_beyond (record of md_watch.md; paths of that session)."""
import blip, torch
from blip.allocator import keep_freed_memory
from blip.bench.protocols import Options, build_plan, data_dir
from blip.uq.recalibration import recalibrate
from blip.io import save_model
keep_freed_memory(); torch.set_num_threads(1)
plan = build_plan("energy-split", data_dir("/work/shared/data"), Options(seed=0, experiments=["acac"]))
exp = plan.experiments[0]
for beyond in (0.2, False):
    model = blip.load("/tmp/w17/nm-ea/runs/seed0/acac/blip/model_calibrated.pt")
    model.config["uq"].update(novelty_beyond=beyond, energy_novelty_beyond=beyond)
    print(beyond, recalibrate(model, exp.valid, seed=0))
    save_model(model, f"/tmp/w33/acac-beyond-{beyond}.pt")
