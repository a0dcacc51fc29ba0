"""The few collectives the MoE layer needs; each is a no-op in a single process."""
from typing import List

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (e.g. expert loads, so |A_i| counts the whole batch)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its gradient travels the same way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: List[int], in_splits: List[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group=None) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns what every rank sent here, in rank order.

    Autograd-aware, and any split may be 0 (gloo and NCCL both take uneven and empty splits).
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)
