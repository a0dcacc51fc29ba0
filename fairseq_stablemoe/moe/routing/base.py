"""The routing contract (RoutingStrategy, with its defaults), what a routing returns, and the token ids it may
route by."""
import abc
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm import all_reduce_sum


@dataclass
class RoutingDecision:
    expert: torch.Tensor  # (n,) expert of each token
    gate: Optional[torch.Tensor]  # (n,) weight of the expert's output; None = hard {0,1} gate
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # token sums, weighted by the criterion
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)  # token sums, for logging
    counts: Optional[torch.Tensor] = None  # (N,) this rank's tokens per expert, if the routing counted them


@dataclass(frozen=True)
class Vocabulary:
    """What routing by token id needs of a fairseq Dictionary: its size, pad id and (for frequency-balanced
    tables) the training data's count of each id."""

    size: int
    padding_idx: int
    counts: Optional[Sequence[int]] = None

    @classmethod
    def of(cls, dictionary) -> "Vocabulary":
        return cls(len(dictionary), dictionary.pad(), list(dictionary.count))


class RoutingStrategy(nn.Module, abc.ABC):
    """Decides, for n hidden states, each one's expert and gate. Everything the MoE layer, the models, the task
    and the criteria may ask of a routing is declared here, with the default of a plain learned routing."""

    loss_names: ClassVar[Tuple[str, ...]] = ()  # what forward() may put in Routing.losses (the criterion weights)
    dense: ClassVar[bool] = False  # a dense control: its one "expert" counts as shared parameters
    staged: ClassVar[bool] = False  # has stages 1 and 2 (stage1_schedule, in_stage2, end_stage1)
    # state whose first dimension is the token vocabulary -> what it is called in the error for another dictionary
    vocab_tables: ClassVar[Dict[str, str]] = {}
    stage2_began: Optional[int] = None  # the update stage 2 began at; None in stage 1 and for unstaged routings

    @classmethod
    def expert_layout(cls, settings, ffn_dim: int) -> Tuple[int, int, int]:
        """(experts, expert FFN inner size, sublayers per expert) of the layer this routing drives."""
        return settings.moe_experts, settings.moe_ffn_embed_dim or ffn_dim, settings.moe_sublayers

    @classmethod
    @abc.abstractmethod
    def build(cls, settings, dim: int, vocab: Vocabulary) -> "RoutingStrategy":
        """The routing --moe-routing names, from the model's config, its width and its vocabulary."""

    @abc.abstractmethod
    def forward(self, h: torch.Tensor, tokens: "TokenView") -> RoutingDecision:
        """Each of h's rows' expert and gate (and the losses and statistics of this forward)."""

    @abc.abstractmethod
    def decide(self, h: torch.Tensor, tokens: "TokenView") -> torch.Tensor:
        """The expert each of h's rows would train with now, with no side effect (routing probes)."""

    @property
    def in_stage2(self) -> bool:
        return self.stage2_began is not None

    def end_stage1(self, num_updates: int):
        raise TypeError(f"{type(self).__name__} has no stages")

    def set_num_updates(self, num_updates: int):
        """fairseq passes its update count to every module, before each training step and on loading."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, what in self.vocab_tables.items():
            saved, own = state_dict.get(prefix + name), self.get_parameter_or_buffer(name)
            if saved is not None and saved.shape[0] != own.shape[0]:
                raise ValueError(
                    f"the checkpoint's {what} covers {saved.shape[0]} token ids but this model's dictionary "
                    f"has {own.shape[0]}: evaluate with the dictionary the model was trained with "
                    f"(the data directory passed to fairseq-train)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_parameter_or_buffer(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        return getattr(self.get_submodule(module) if module else self, leaf)


class CentroidRouting(RoutingStrategy):
    """Routes by the affinities s = E·h of the hidden states to N learned expert centroids E."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))  # E
        nn.init.orthogonal_(self.centroids, gain=0.1)

    @classmethod
    def build(cls, settings, dim: int, vocab: Vocabulary) -> "CentroidRouting":
        return cls(dim, settings.moe_experts)


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

    def sentences(self) -> torch.Tensor:
        """(n,) the batch row (sentence) of each routed hidden state."""
        rows = torch.arange(self.tokens.size(0), device=self.tokens.device)
        return self.select(rows[:, None].expand(-1, self.last))


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Routing precision: float32 for fp16/bf16 (and under autocast), float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def affinities(h: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """s_{t,i} = E_iᵀ h_t, in at least float32 so mixed precision cannot change a routing decision, and always
    finite: NaN counts as 0 and ±inf as the largest float, so a token whose hidden state overflowed still
    gets a valid expert and a finite gate (its gradient through the replaced entries is 0)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return torch.nan_to_num(F.linear(at_least_float32(h), at_least_float32(centroids)), nan=0.0)


GATHER_FROM_EXPERTS = 16  # see _ChosenAffinity.backward


class _ChosenAffinity(torch.autograd.Function):
    """(s_{t,e_t}, s) for one expert e_t per token, differentiable through s_{t,e_t} only.

    The forward's n×N product costs what n gathered dot products cost (on CPU the gather is memory-bound, the
    product is not), and the caller's statistics need all of s anyway. The backward with many experts is the gain:
    O(n·d) gathers in place of two n×N×d products with a mostly-zero n×N gradient. With few experts those products
    are cheaper than the gathers' extra passes over n×d memory (benchmarks/routing.py times both; its figures are in
    benchmarks/README.md), so below GATHER_FROM_EXPERTS the backward is autograd's, on the mostly-zero gradient.
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
    """(affinities(h, centroids)[t, expert[t]], affinities(h, centroids) without gradient): the same precision and
    finiteness rules, and the backward of the chosen entries only."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        chosen, s = _ChosenAffinity.apply(at_least_float32(h), at_least_float32(centroids), expert)
        return torch.nan_to_num(chosen, nan=0.0), torch.nan_to_num(s, nan=0.0)


def expert_load(expert: torch.Tensor, num_experts: int, global_: bool) -> torch.Tensor:
    """|A_i|: tokens per expert, summed over all ranks when `global_` (training)."""
    return load_and_counts(expert, num_experts, global_)[0]


def load_and_counts(expert: torch.Tensor, num_experts: int, global_: bool):
    """(expert_load, this rank's counts): the layer splits its tokens by the counts, so it need not count again."""
    counts = torch.bincount(expert, minlength=num_experts)
    return (all_reduce_sum(counts.clone()) if global_ else counts), counts
