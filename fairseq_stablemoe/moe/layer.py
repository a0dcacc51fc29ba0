"""One MoE layer: a routing strategy decides, the shared machinery dispatches, computes, combines.

Dimensions (fairseq's names where it has them):
    T  positions of the forward (x is T x B x C, time-major)     B  sentences       C  model width (d)
    S  the whole prefix of token ids (tokens is B x S, S >= T)   n  routed (non-pad) tokens, rows of h (n x C)
    N  experts of the layer                                      E  experts on this process (N, or N / W)
    W  processes the experts are sharded over                    F  expert FFN inner size
"""
from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn

from .dispatch import LocalDispatcher
from .experts import Experts
from . import gate_stats
from .routing import RoutingDecision, TokenView


def capacity_keep(expert_sorted: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which of the expert-sorted tokens fit: the first `capacity` of each expert, in token order."""
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(expert_sorted.numel(), device=counts.device) - starts[expert_sorted]
    return rank_in_expert < capacity


class _Permute(torch.autograd.Function):
    """Rows of x in `order`, a permutation: the backward is a gather by the inverse permutation.

    Indexing (x[order], x.index_copy) would instead scatter-add the gradient into zeros, or copy x whole.
    """

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class MoELayer(nn.Module):
    """h_t + g_t · FFN_{e_t}(h_t) for each token's expert e_t (paper Eq. 4), inserted between blocks.

    Pad tokens are not routed: they pass through unchanged and count in no statistic or loss.
    Tokens over an expert's capacity pass through unchanged too.
    """

    def __init__(self, routing: nn.Module, experts: Experts, num_experts: int, padding_idx: int,
                 capacity_factor: float = 0.0, eval_capacity_factor: float = 0.0, dispatcher=None):
        super().__init__()
        self.routing = routing
        self.experts = experts
        self.num_experts = num_experts
        self.padding_idx = padding_idx
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.dispatcher = dispatcher or LocalDispatcher()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x: T x B x C hidden states; tokens: B x S ids whose last T positions are x's tokens.

        Returns the output and this forward's aux: the routing's losses (`<name>_loss`, token sums) and
        statistics (`load`, token sums), `tokens` routed and `dropped` over capacity, the `gate` statistics of a
        soft gate. Nothing is kept here; a stack completes it for the criterion (`report`)."""
        flat, h, view = self._routed_rows(x, tokens)
        decision = self.routing(h, view)
        y, aux = self._compute(h, decision)

        out = y if view.index is None else flat.index_copy(0, view.index, y)
        return out.view(x.shape), aux

    def report(self, aux: Dict[str, torch.Tensor], ran: bool) -> Dict[str, torch.Tensor]:
        """What the layer reports to the criterion for a forward: every key, in every forward, so that ranks can
        sum them key by key and the criterion needs nothing else. `aux` has what forward() computed; the rest is
        zero:
        - `<name>_loss` for each of the routing's loss_names (token sums; zero where the objective lacks it);
        - `tokens` routed, `dropped` over capacity;
        - a routed (not dense) layer: `forwards` (1, or 0 for a layer skipped by layerdrop), `load` (N,) tokens
          per expert and `gate`, a gate_stats row (zeros without a soft gate);
        - a staged routing: `stage` (1 or 2) and `distill_agree` (tokens whose distilled route is the backbone's).
        """
        full, device = dict(aux), self.experts.device

        def fill(key, *shape, value=0, dtype=torch.long):  # torch.full: no host-to-device copy on a GPU
            if key not in full:
                full[key] = torch.full(shape, value, dtype=dtype, device=device)

        for name in self.routing.loss_names:
            fill(f"{name}_loss", dtype=torch.float32)
        fill("tokens")
        fill("dropped")
        if not self.routing.dense:
            fill("forwards", value=int(ran))
            fill("load", self.num_experts)
            fill("gate", gate_stats.ROW, dtype=torch.float64)
        if self.routing.staged:
            fill("stage", value=2 if self.routing.in_stage2 else 1)
            fill("distill_agree")
        return full

    @torch.no_grad()
    def decide(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """B x T: the expert each token of x would train with now (the routing's decide()), -1 at pads.

        Nothing is computed by the experts and nothing is stored: routing probes call this between updates.
        """
        seq_len, bsz, _ = x.shape
        _, h, view = self._routed_rows(x, tokens)
        expert = torch.full((seq_len * bsz,), -1, dtype=torch.long, device=x.device)
        decided = self.routing.decide(h, view)
        if view.index is None:
            expert.copy_(decided)
        else:
            expert[view.index] = decided
        return expert.view(seq_len, bsz).t()

    def _routed_rows(self, x: torch.Tensor, tokens: torch.Tensor):
        """(all rows of x flattened time-major, the non-pad rows that get routed, their TokenView)."""
        seq_len, _, dim = x.shape
        flat = x.reshape(-1, dim)
        index = tokens[:, -seq_len:].t().reshape(-1).ne(self.padding_idx).nonzero().squeeze(1)
        if index.numel() == flat.size(0):  # nonzero() already synchronised, so this test is free
            index = None
        h = flat if index is None else flat[index]
        return flat, h, TokenView(tokens, seq_len, index)

    def _compute(self, h: torch.Tensor, decision: RoutingDecision) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        expert = decision.expert
        expert_sorted, order = torch.sort(expert, stable=True)
        counts = decision.counts if decision.counts is not None else torch.bincount(expert, minlength=self.num_experts)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        dropped = counts.new_zeros(())
        if factor > 0:
            capacity = max(1, int(factor * h.size(0) / self.num_experts))
            keep = capacity_keep(expert_sorted, counts, capacity)
            order = order[keep]
            dropped = counts.sum() - keep.sum()
            counts = counts.clamp(max=capacity)

        # without drops the sort is a permutation of the rows, undone by the inverse permutation
        inverse = inverse_permutation(order) if order.numel() == h.size(0) else None
        x_sorted = h[order] if inverse is None else _Permute.apply(h, order, inverse)
        y_sorted = self.dispatcher(x_sorted, counts.tolist(), self.experts)
        if decision.gate is not None:
            y_sorted = torch.lerp(x_sorted, y_sorted, decision.gate[order].to(y_sorted.dtype).unsqueeze(1))
        aux = {
            **{f"{k}_loss": v for k, v in decision.losses.items()},
            **decision.stats,
            "tokens": h.new_tensor(h.size(0), dtype=torch.long),
            "dropped": dropped,
        }
        if decision.gate is not None:  # its distribution: what a closing gate does to the experts (issue 20)
            aux["gate"] = gate_stats.gate_row(decision.gate)
        if inverse is None:  # dropped tokens pass through unchanged
            return h.index_copy(0, order, y_sorted), aux
        return _Permute.apply(y_sorted, inverse, order), aux


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    return (m for m in model.modules() if isinstance(m, MoELayer))
