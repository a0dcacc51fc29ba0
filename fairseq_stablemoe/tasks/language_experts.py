"""Which languages use which experts: per-(language, expert) token counts, summable over batches and ranks.

Encoder MoE layers count a token under its sentence's source language, decoder MoE layers under the target
language. The translation task records each layer's routing decisions for the duration of one validation step.
"""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import metrics

from ..moe import EncoderMoELayer, MoELayer, moe_layers

ENCODER, DECODER = 0, 1


@contextlib.contextmanager
def routing_decisions(model):
    """Within the block: {MoE layer: [(expert, sentence) of each routed token, per forward]}."""
    decisions: Dict[MoELayer, List[Tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(layer):
        return lambda routing, args, out: decisions.setdefault(layer, []).append((out.expert, args[1].sentences()))

    handles = [layer.routing.register_forward_hook(record(layer)) for layer in moe_layers(model)]
    try:
        yield decisions
    finally:
        for handle in handles:
            handle.remove()


def language_expert_counts(decisions, src_lang: torch.Tensor, tgt_lang: torch.Tensor, num_langs: int,
                           num_experts: int) -> torch.Tensor:
    """2 x languages x experts token counts; row 0: encoder layers, row 1: decoder layers."""
    counts = torch.zeros(2, num_langs, num_experts, dtype=torch.long)
    for layer, forwards in decisions.items():
        side = ENCODER if isinstance(layer, EncoderMoELayer) else DECODER
        for expert, sentence in forwards:
            lang = (src_lang if side == ENCODER else tgt_lang).to(sentence.device)[sentence]
            keep = lang >= 0
            counts[side].index_put_((lang[keep].cpu(), expert[keep].cpu()),
                                    torch.ones((), dtype=torch.long), accumulate=True)
    return counts



def usage_summary(counts: torch.Tensor, langs: List[str], top: int = 2) -> str:
    """`de:3,17 fr:3,9 ...`: each language's most used experts."""
    return " ".join(f"{lang}:{','.join(str(int(e)) for e in row.topk(min(top, row.numel())).indices)}"
                    for lang, row in zip(langs, counts) if row.sum() > 0)


def language_overlap(counts: torch.Tensor) -> Optional[float]:
    """Mean over language pairs of Σ_e min(p_a(e), p_b(e)): 1 = same expert mix, 0 = disjoint experts."""
    rows = counts[counts.sum(1) > 0].double()
    if rows.size(0) < 2:
        return None
    p = rows / rows.sum(1, keepdim=True)
    overlap = torch.minimum(p[:, None], p[None]).sum(-1)
    n = p.size(0)
    return float((overlap.sum() - overlap.diagonal().sum()) / (n * (n - 1)))


def log_language_usage(counts: torch.Tensor, langs: List[str]) -> None:
    """Log the summed counts (hidden) and, derived from them at print time, the per-language summaries."""
    metrics.log_scalar_sum("_moe_lang_expert", counts.double())
    for side, name in ((ENCODER, "enc"), (DECODER, "dec")):
        metrics.log_derived(f"lang_experts_{name}",
                            lambda m, s=side: usage_summary(m["_moe_lang_expert"].sum[s], langs))
        if (counts[side].sum(1) > 0).sum() > 1:  # overlap needs two languages on this side
            metrics.log_derived(f"lang_overlap_{name}",
                                lambda m, s=side: language_overlap(m["_moe_lang_expert"].sum[s]))
