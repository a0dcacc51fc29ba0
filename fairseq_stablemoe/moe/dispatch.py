"""Moving routed tokens to their experts and back."""
from typing import List

import torch
import torch.distributed as dist

from .comm import all_to_all
from .experts import Experts


class LocalDispatcher:
    """All experts live in this process: rows grouped by expert go straight to the experts."""

    def __call__(self, x_sorted: torch.Tensor, counts: List[int], experts: Experts) -> torch.Tensor:
        return experts(x_sorted, counts)


class ExpertParallelDispatcher:
    """Experts sharded over `world` ranks, rank r owning the global ids [r·L, (r+1)·L), L = N / world.

    Rows arrive sorted by global expert, so the rows for rank r are one contiguous block: one all-to-all
    takes them there (after a tiny one that tells every rank how many rows of each expert it gets), the
    owner groups them by local expert and runs its experts, and the reverse all-to-all brings them home
    in the order they left. Every rank makes the same collective calls whatever its token counts, zero
    included, so no rank can wait for another that skipped one.
    """

    def __init__(self, num_experts: int, world: int, group=None):
        if num_experts % world:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {world} ranks")
        self.num_experts, self.world, self.group = num_experts, world, group
        self.local = num_experts // world

    def __call__(self, x_sorted: torch.Tensor, counts: List[int], experts: Experts) -> torch.Tensor:
        send_counts = torch.tensor(counts, dtype=torch.long, device=x_sorted.device)
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert], flattened
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(self.world, self.local).sum(1).tolist()
        recv_counts = recv_counts.view(self.world, self.local)
        recv_splits = recv_counts.sum(1).tolist()

        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group)  # rows by (source, local expert)
        local_expert = torch.arange(self.local, device=x_sorted.device).repeat(self.world)
        by_expert = torch.sort(torch.repeat_interleave(local_expert, recv_counts.reshape(-1)), stable=True).indices
        y = experts(x_recv[by_expert], recv_counts.sum(0).tolist())
        y_recv = torch.empty_like(y).index_copy(0, by_expert, y)
        return all_to_all(y_recv, send_splits, recv_splits, self.group)
