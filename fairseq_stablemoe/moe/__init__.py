"""The MoE layer: routing strategies, experts, dispatch, and where layers go in a model."""
import logging
from typing import Iterator, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from . import comm
from .config import MoEConfig, validate_moe_config
from .dispatch import ExpertParallelDispatcher
from .expert_parallel import expert_parallel_world, expert_shard, tag_expert_parameters
from .experts import Experts
from .layer import MoELayer
from .placement import (
    DecoderMoELayer, EncoderMoELayer, FeedsDecoderTokenIds, FeedsEncoderTokenIds, place_moe_layers,
)
from .routing import ROUTINGS, StableMoERouting


logger = logging.getLogger(__name__)

def build_routing(cfg, dim: int, vocab_size: int, padding_idx: int,
                  token_counts: Optional[Sequence[int]] = None) -> nn.Module:
    routing = ROUTINGS[str(cfg.moe_routing)]
    if getattr(routing, "routes_by_token_frequency", False):  # e.g. hash: its table comes from the counts
        return routing.build(cfg, dim, vocab_size, padding_idx, token_counts=token_counts)
    return routing.build(cfg, dim, vocab_size, padding_idx)


def expert_layout(cfg, ffn_dim: int) -> Tuple[int, int, int]:
    """(experts, expert FFN inner size, sublayers per expert); dense controls reshape it."""
    routing = ROUTINGS[str(cfg.moe_routing)]
    if hasattr(routing, "expert_layout"):
        return routing.expert_layout(cfg, ffn_dim)
    return cfg.moe_experts, cfg.moe_ffn_embed_dim or ffn_dim, cfg.moe_sublayers


def build_moe_layer(cfg, dim: int, ffn_dim: int, dictionary, activation: str = "relu",
                    layer_cls: Type[MoELayer] = MoELayer) -> MoELayer:
    num_experts, expert_ffn_dim, sublayers = expert_layout(cfg, ffn_dim)
    world = expert_parallel_world(cfg, num_experts=num_experts)
    rank = comm.rank() if world > 1 else 0
    # drawn on every rank alike, so expert i has the same weights wherever it lives
    seed = int(torch.randint(2**31 - 1 - num_experts, (), device="cpu").item())
    experts = Experts(expert_shard(num_experts, world, rank), dim, expert_ffn_dim, sublayers, activation, seed=seed)
    dispatcher = None
    if world > 1:
        dispatcher = ExpertParallelDispatcher(num_experts, world)
        tag_expert_parameters(experts)
        experts.needs_gathered = rank == 0
        logger.info(f"expert parallel: rank {rank} of {world} holds experts {experts.global_ids} of {num_experts}")
    routing = build_routing(cfg, dim, len(dictionary), dictionary.pad(), token_counts=dictionary.count)
    return layer_cls(routing, experts, num_experts, dictionary.pad(),
                     cfg.capacity_factor, cfg.eval_capacity_factor, dispatcher)


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    return (m for m in model.modules() if isinstance(m, MoELayer))


def parameter_counts(model: nn.Module) -> Tuple[int, int, int]:
    """(shared, expert, routing) parameters, counted as the paper does (Table 2): routers apart, and a dense
    control's FFN stack shared."""
    expert = routing = 0
    for layer in moe_layers(model):
        routing += sum(p.numel() for p in layer.routing.parameters())
        if not getattr(layer.routing, "dense", False):
            expert += sum(p.numel() for p in layer.experts.parameters())
    return sum(p.numel() for p in model.parameters()) - expert - routing, expert, routing


__all__ = [
    "MoEConfig", "validate_moe_config", "MoELayer", "DecoderMoELayer", "EncoderMoELayer", "Experts",
    "StableMoERouting", "ExpertParallelDispatcher", "build_moe_layer", "moe_layers", "parameter_counts",
    "place_moe_layers",
    "FeedsDecoderTokenIds", "FeedsEncoderTokenIds",
]
