"""What every routing strategy returns, and the token ids it may route by."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..comm import all_reduce_sum


@dataclass
class Routing:
    expert: torch.Tensor  # (n,) expert of each token
    gate: Optional[torch.Tensor]  # (n,) weight of the expert's output; None = hard {0,1} gate
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # token sums, weighted by the criterion
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)  # token sums, for logging


class TokenView:
    """The token ids behind the n hidden states being routed.

    `tokens` is the whole prefix (B x S); the hidden states are its `last` positions, flattened
    time-major (as fairseq's T x B x C) and restricted to the non-pad rows `index`.
    """

    def __init__(self, tokens: torch.Tensor, last: int, index: Optional[torch.Tensor]):
        self.tokens, self.last, self.index = tokens, last, index

    def select(self, per_position: torch.Tensor) -> torch.Tensor:
        """B x last x ... -> n x ... in the order of the routed hidden states."""
        flat = per_position.transpose(0, 1).reshape(-1, *per_position.shape[2:])
        return flat if self.index is None else flat[self.index]

    def ids(self) -> torch.Tensor:
        return self.select(self.tokens[:, -self.last:])


def affinities(h: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """s_{t,i} = E_iᵀ h_t, always in float32 so mixed precision cannot change a routing decision, and always
    finite: NaN counts as 0 and ±inf as the largest float, so a token whose hidden state overflowed still
    gets a valid expert and a finite gate (its gradient through the replaced entries is 0)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return torch.nan_to_num(F.linear(h.float(), centroids.float()), nan=0.0)


def expert_load(expert: torch.Tensor, num_experts: int, global_: bool) -> torch.Tensor:
    """|A_i|: tokens per expert, summed over all ranks when `global_` (training)."""
    counts = torch.bincount(expert, minlength=num_experts)
    return all_reduce_sum(counts) if global_ else counts
