"""Hash Layers routing (Roller et al., 2021), a baseline of the paper's Table 1: a fixed token id -> expert
table, no gate, no balance loss.

`balanced` (Hash Layers' frequency-balanced hash): built once before training from the training data's
token counts (the fairseq dictionary's), taking the most frequent tokens first, each to the expert with the
fewest tokens so far. `random`: a seeded uniform map. `file` (an ablation beyond the paper): the table a
StableMoE run froze at its switch to stage 2, read from its checkpoint, so that a fresh run routes by it from
update 0. Whatever its source, the table is a buffer, so the checkpoint carries it and evaluation routes exactly
as training did.

--hash-gate sigmoid (beyond the paper): StableMoE's stage-2 gate on the table's expert e, h + σ(E_e·h)·FFN_e(h),
with centroids E learned through the gate alone. With --hash-type file it is StableMoE's stage 2 from update 0.
"""
import heapq
from typing import Sequence

import torch
import torch.nn as nn

from .base import RoutingDecision, RoutingStrategy, TokenView, Vocabulary, chosen_affinity, expert_load


def balanced_hash(token_counts: Sequence[int], num_experts: int) -> torch.Tensor:
    table = torch.empty(len(token_counts), dtype=torch.long)
    emptiest = [(0, expert) for expert in range(num_experts)]  # (tokens so far, expert): a min-heap
    for token in sorted(range(len(token_counts)), key=lambda t: -token_counts[t]):
        load, expert = heapq.heappop(emptiest)
        table[token] = expert
        heapq.heappush(emptiest, (load + token_counts[token], expert))
    return table


def random_hash(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    return torch.randint(num_experts, (vocab_size,), generator=torch.Generator().manual_seed(seed))


class HashRouting(RoutingStrategy):
    vocab_tables = {"table": "hash table"}

    def __init__(self, table: torch.Tensor, num_experts: int, dim: int = 0, gated: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("table", table)
        # E of StableMoE's gate: initialised as StableMoE's centroids are
        self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, dim), gain=0.1)) if gated \
            else None

    @classmethod
    def build(cls, settings, dim: int, vocab: Vocabulary) -> "HashRouting":
        gated = settings.hash_gate == "sigmoid"
        return cls(cls.build_table(settings, vocab), settings.moe_experts, dim, gated)

    @staticmethod
    def build_table(settings, vocab: Vocabulary) -> torch.Tensor:
        vocab_size, token_counts, experts = vocab.size, vocab.counts, settings.moe_experts
        if settings.hash_type == "random":
            return random_hash(vocab_size, experts, settings.seed)
        if settings.hash_type == "file":
            from .table_file import read_routing_table

            return read_routing_table(settings.hash_table, vocab_size, experts)
        if token_counts is None or len(token_counts) != vocab_size:
            raise ValueError(
                f"--hash-type balanced needs the training data's count of each of the dictionary's {vocab_size} "
                f"tokens (a dict.txt written by fairseq-preprocess); use --hash-type random otherwise")
        return balanced_hash(token_counts, experts)

    @torch.no_grad()
    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        return self.table[tokens.ids()]

    def forward(self, h: torch.Tensor, tokens: TokenView) -> RoutingDecision:
        expert = self.decide(h, tokens)
        # --hash-gate sigmoid: StableMoE's Eq. 14 on the table's expert
        gate = None if self.centroids is None else torch.sigmoid(chosen_affinity(h, self.centroids, expert)[0])
        return RoutingDecision(expert=expert, gate=gate,
                               stats={"load": expert_load(expert, self.num_experts, global_=self.training)})
