"""The few collectives the MoE layer needs; each is a no-op in a single process."""
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (e.g. expert loads, so |A_i| counts the whole batch)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t
