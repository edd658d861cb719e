"""Figures reduced over the training ranks (the loop's metrics, an objective's batch statistics): plain Python on
torch.distributed, a no-op for one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def across_ranks(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """`values` reduced element-wise over every rank (on the GPU under NCCL, which reduces no CPU tensor)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size() > 1:
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def mean_across_ranks(values: list[float]) -> list[float]:
    return [v / world_size() for v in across_ranks(values)]


def max_across_ranks(value: float) -> float:
    return across_ranks([value], dist.ReduceOp.MAX)[0]


def gathered(mine: list) -> list:
    """Every rank's list, concatenated in rank order."""
    out: list = [None] * world_size()
    dist.all_gather_object(out, mine)
    return [item for part in out for item in part]
