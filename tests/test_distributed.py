"""Data-parallel training (torch.distributed, gloo, 2 processes on loopback) equals one process.

``training.batch_size`` is the global batch: with the same order and seed, the 2-rank run
ends with the parameters of the 1-rank run up to floating-point summation order (float64,
relative tolerance 1e-8: the rate heads see principal-component coordinates of the feature
statistics, and the eigenvectors amplify the rounding of sums taken in another order by one
over the eigenvalue gaps; measured 8.5e-10). A 2-rank run stopped after an epoch
(training.max_epochs) and resumed gives the uninterrupted run's model.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip.train.datasets import prepare_data
from blip.train.loop import Trainer
from conftest import tiny_config

TOL = 1e-8


def _config(tmp_path, **training):
    # 13 training structures, global batch 4: the last batch has one structure, so rank 1 runs a placeholder
    return tiny_config(tmp_path, model={"dtype": "float64"}, data={"max_train": 13},
                       training={"epochs": 2, "batch_size": 4, "patience": 50, "tensorboard": False, **training})


def _worker(rank, world, init_file, cfgs, result, atoms):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cfg in cfgs:
            model = Trainer(cfg, progress=False).run()
        pred = model.predict_distributed(atoms, samples=3, seed=5) if atoms else None
        given = None
        if atoms:  # the noise-free values handed in: each rank takes its own structures' share
            noise_free = model.predict(atoms, samples=0)
            given = model.predict_distributed(atoms, samples=3, seed=5, map_values={
                "energy": noise_free["energy"], "forces": noise_free["forces"]})
        if rank == 0:
            torch.save({"state": {k: v.cpu() for k, v in model.members[0].state_dict().items()}, "pred": pred,
                        "given": given}, result)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, cfgs, world=2, atoms=None, with_prediction=False):
    """Run the configs one after the other in ``world`` gloo processes; rank 0's final state dict
    (and the prediction of ``atoms`` by the last model, split over the ranks)."""
    init_file, result = tmp_path / "rendezvous", tmp_path / "state.pt"
    if init_file.exists():
        init_file.unlink()
    mp.spawn(_worker, args=(world, str(init_file), cfgs, str(result), atoms), nprocs=world, join=True)
    out = torch.load(result, weights_only=False)
    return (out["state"], out["pred"], out["given"]) if with_prediction else out["state"]


def assert_close(a: dict, b: dict, tol=TOL) -> float:
    worst = 0.0
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        if x.numel() == 0:
            continue
        rel = float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))
        worst = max(worst, rel)
    assert worst <= tol, f"largest relative difference {worst:.3g} > {tol}"
    return worst


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_equal_one_rank_and_resume_is_exact(tmp_path):
    one = Trainer(_config(tmp_path / "one"), progress=False).run()
    ref = {k: v.cpu() for k, v in one.members[0].state_dict().items()}

    atoms = [s.atoms for s in prepare_data(_config(tmp_path / "x")).valid[:5]]
    two, pred, given = run_ranks(tmp_path, [_config(tmp_path / "two")], atoms=atoms, with_prediction=True)
    worst = assert_close(two, ref)
    print(f"2 ranks vs 1 rank: largest relative parameter difference {worst:.3g}")
    # prediction split over the 2 ranks, gathered in input order = one process (same model up to 1e-12)
    single = one.predict(atoms, samples=3, seed=5)
    assert np.allclose(pred["energy"], single["energy"], rtol=1e-9, atol=1e-9)
    assert np.allclose(pred["energy_std"], single["energy_std"], rtol=1e-6, atol=1e-9)
    assert all(np.allclose(a, b, atol=1e-8) for a, b in zip(pred["forces"], single["forces"]))
    # with the noise-free values handed in (split over the ranks): the same prediction and spreads
    np.testing.assert_allclose(given["energy"], pred["energy"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(given["energy_std"], pred["energy_std"], rtol=1e-12, atol=1e-12)
    assert all(np.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(given["forces_std"], pred["forces_std"]))

    paused = _config(tmp_path / "paused", max_epochs=1)
    resumed = copy.deepcopy(paused)
    resumed["training"].update(max_epochs=None, resume=True)
    again = run_ranks(tmp_path, [paused, resumed])
    assert_close(again, two, tol=TOL)
    log = (tmp_path / "paused" / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + one row per epoch, written by rank 0 only
    assert not any(p.name.startswith(".") for p in (tmp_path / "paused" / "run").iterdir())
    assert os.path.isfile(tmp_path / "paused" / "run" / "checkpoint.pt")


def _ensemble_worker(rank, world, init_file, cfg, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = Trainer(cfg, progress=False).run()
        if rank == 0:
            torch.save([{k: v.cpu() for k, v in m.state_dict().items()} for m in model.members], result)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ensemble_members_are_spread_over_ranks_and_gathered(tmp_path):
    # 3 members on 2 ranks: rank 0 trains members 0 and 2, rank 1 member 1, each alone on the whole
    # training set; the gathered ensemble equals the one-process ensemble member by member.
    def cfg(where):
        c = _config(where, epochs=1)
        c["uq"].update(method="ensemble", ensemble_size=3)
        return c

    one = Trainer(cfg(tmp_path / "one"), progress=False).run()
    init_file, result = tmp_path / "rendezvous", tmp_path / "members.pt"
    mp.spawn(_ensemble_worker, args=(2, str(init_file), cfg(tmp_path / "two"), str(result)), nprocs=2, join=True)
    members = torch.load(result, weights_only=False)
    assert len(members) == 3
    for got, ref in zip(members, one.members):
        assert_close(got, {k: v.cpu() for k, v in ref.state_dict().items()}, tol=1e-12)
    run = tmp_path / "two" / "run"
    log = (run / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["0", "1", "2"]  # one epoch per member, in order
    assert (run / "rank0" / "checkpoint.pt").is_file() and (run / "rank1" / "checkpoint.pt").is_file()
    from blip.io import load

    assert len(load(run / "model.pt").members) == 3
