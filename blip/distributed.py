"""Multi-process runs with ``torch.distributed`` (``torchrun --nproc_per_node N -m blip ...``).

One process per rank; gloo on CPU, NCCL on CUDA with one device per local rank. BLIP does not
wrap the model in ``DistributedDataParallel``: its training step has a variable sequence of
passes (a sampled pass with a KL term, every ``uq.contrastive.every``-th step a contrastive pass
through a second entry point, ``model.rates``) that DDP's single-``forward`` hooks do not fit.
Instead every rank runs the same sequence of passes on its part of the global batch and the
gradients are summed with one ``all_reduce`` of a flat buffer after ``backward`` (the standard
data-parallel step; the losses are normalised by global counts, so the sum of the ranks'
gradients is the gradient of the global batch). See docs/distributed.md.

Outside a process group every helper is a no-op for one process (rank 0 of 1).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


_LOCAL = {"on": False}


def active() -> bool:
    """True inside an initialised process group with more than one rank (and not in :func:`local`)."""
    return (not _LOCAL["on"]) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local():
    """Within this block this rank works on its own: every helper acts as for one process (rank 0
    of 1): no collectives, and this rank counts as the one that writes (e.g. ensemble members
    spread over the ranks, each trained by one rank)."""
    old = _LOCAL["on"]
    _LOCAL["on"] = True
    try:
        yield
    finally:
        _LOCAL["on"] = old


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str | None = None) -> str | None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); returns the device string of this rank (``cuda:LOCAL_RANK`` for
    a CUDA run, else ``device``). Does nothing (returns ``device``) without that environment."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = (device or "cpu").startswith("cuda") and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return f"cuda:{local}" if cuda else device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _device() -> torch.device:
    """Device of the collectives' buffers: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (in place when the tensor lives on the collective's device)."""
    if not active():
        return tensor
    buf = tensor.to(_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf.to(tensor.device))
    return tensor


def sum_floats(values: list[float]) -> list[float]:
    """Sums over the ranks of a list of Python numbers (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(t).tolist()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank (decisions that must be collective)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def any_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_module(module: torch.nn.Module) -> None:
    """Parameters and buffers of rank 0 on every rank (a start from identical weights)."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.data.to(_device())
        dist.broadcast(buf, src=0)
        t.data.copy_(buf.to(t.device))


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_gradients(parameters, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the gradients of ``parameters`` over the ranks with one all_reduce of a flat buffer.

    A parameter without a gradient on a rank adds zeros; it gets the summed gradient when any
    rank had one (and keeps ``None`` when none had). ``extra`` (a small tensor, e.g. the loss)
    travels in the same buffer; its sum is returned."""
    if not active():
        return extra
    params = list(parameters)
    if not params:
        return extra
    ref = params[0]
    flat = [p.grad.reshape(-1).to(torch.float64) if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64,
                                                                                        device=ref.device)
            for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=ref.device)
    tail = [] if extra is None else [extra.detach().reshape(-1).to(torch.float64).to(ref.device)]
    buf = torch.cat(flat + [has] + tail).to(_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = buf.to(ref.device)
    offset = 0
    for p, h in zip(params, buf[sum(f.numel() for f in flat): sum(f.numel() for f in flat) + len(params)]):
        n = p.numel()
        if h > 0:
            g = buf[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n
    return None if extra is None else buf[offset + len(params):].view_as(extra).to(extra.dtype)


@contextmanager
def process_group_from_env(device: str | None = None):
    """``init_from_env`` for the duration of a command; the group is destroyed afterwards."""
    started = launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    dev = init_from_env(device)
    try:
        yield dev
    finally:
        if started:
            shutdown()
