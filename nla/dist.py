"""Data parallelism with torchrun + torch.distributed, kept to what the loops need.

Each rank takes a contiguous slice of the global batch of activations (a GRPO group never
straddles ranks). Losses are normalised by GLOBAL counts and gradients are summed, so N ranks
make exactly the update one process would make on the whole batch.
"""
from __future__ import annotations

import faulthandler
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    if "RANK" in os.environ and not dist.is_initialized():
        # a rank that aborts inside gloo or NCCL leaves no Python error; this prints its stacks
        faulthandler.enable()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank(), world()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(n: int) -> slice:
    """This rank's rows of a global batch of n (n must divide evenly)."""
    w, r = world(), rank()
    if n % w:
        raise ValueError(f"global batch {n} is not divisible by {w} ranks")
    k = n // w
    return slice(r * k, (r + 1) * k)


def sum_(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def sum_grads(params) -> None:
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    out = [None] * world()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def finish() -> None:
    """Barrier, then tear the group down: a rank that exits while another still talks makes
    gloo abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
