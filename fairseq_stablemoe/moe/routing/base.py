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
    counts: Optional[torch.Tensor] = None  # (N,) this rank's tokens per expert, if the routing counted them


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


GATHER_FROM_EXPERTS = 16  # see _ChosenAffinity.backward


class _ChosenAffinity(torch.autograd.Function):
    """(s_{t,e_t}, s) for one expert e_t per token, differentiable through s_{t,e_t} only.

    The forward's n×N product costs what n gathered dot products cost (on CPU the gather is memory-bound, the
    product is not), and the caller's statistics need all of s anyway. The backward with many experts is the gain:
    O(n·d) gathers in place of two n×N×d products with a mostly-zero n×N gradient. With few experts those products
    are cheaper than the gathers' extra passes over n×d memory (benchmarks/routing.py on CPU: the gathers lose at
    N 1 and 8, win from N 32), so there the backward is autograd's, on the mostly-zero gradient.
    """

    @staticmethod
    def forward(ctx, h, centroids, expert):
        ctx.save_for_backward(h, centroids, expert)
        s = F.linear(h, centroids)
        ctx.mark_non_differentiable(s)
        return s.gather(1, expert[:, None]).squeeze(1), s

    @staticmethod
    def backward(ctx, grad, _):
        h, centroids, expert = ctx.saved_tensors
        need_h, need_c = ctx.needs_input_grad[:2]
        if centroids.size(0) < GATHER_FROM_EXPERTS:
            grad_s = grad.new_zeros(h.size(0), centroids.size(0)).scatter_(1, expert[:, None], grad[:, None])
            return grad_s @ centroids if need_h else None, grad_s.t() @ h if need_c else None, None
        grad_h = centroids.index_select(0, expert).mul_(grad.unsqueeze(1)) if need_h else None
        grad_c = torch.zeros_like(centroids).index_add_(0, expert, h * grad.unsqueeze(1)) if need_c else None
        return grad_h, grad_c, None


def chosen_affinity(h: torch.Tensor, centroids: torch.Tensor, expert: torch.Tensor):
    """(affinities(h, centroids)[t, expert[t]], affinities(h, centroids) without gradient): the same float32 and
    finiteness rules, and the backward of the chosen entries only."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        chosen, s = _ChosenAffinity.apply(h.float(), centroids.float(), expert)
        return torch.nan_to_num(chosen, nan=0.0), torch.nan_to_num(s, nan=0.0)


def expert_load(expert: torch.Tensor, num_experts: int, global_: bool) -> torch.Tensor:
    """|A_i|: tokens per expert, summed over all ranks when `global_` (training)."""
    return load_and_counts(expert, num_experts, global_)[0]


def load_and_counts(expert: torch.Tensor, num_experts: int, global_: bool):
    """(expert_load, this rank's counts): the layer splits its tokens by the counts, so it need not count again."""
    counts = torch.bincount(expert, minlength=num_experts)
    return (all_reduce_sum(counts.clone()) if global_ else counts), counts
