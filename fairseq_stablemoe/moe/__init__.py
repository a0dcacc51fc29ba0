"""The MoE layer: routing strategies, experts, dispatch, and where layers go in a model."""
import logging
from typing import Iterator, Tuple, Type

import torch
import torch.nn as nn

from . import comm
from .config import MoEConfig, MoELayerConfig, validate_moe_config, validate_moe_layer_config
from .dispatch import ExpertParallelDispatcher
from .expert_parallel import expert_parallel_world, expert_shard, tag_expert_parameters
from .experts import Experts
from .layer import MoELayer
from .placement import (
    DecoderMoELayer, EncoderMoELayer, FeedsDecoderTokenIds, FeedsEncoderTokenIds, place_moe_layers,
)
from .routing import ROUTINGS, RoutingStrategy, StableMoERouting, Vocabulary


logger = logging.getLogger(__name__)

def build_moe_layer(cfg, dim: int, ffn_dim: int, vocab: Vocabulary, activation: str = "relu",
                    layer_cls: Type[MoELayer] = MoELayer) -> MoELayer:
    """An MoE layer for hidden states of size `dim` whose tokens are ids of `vocab`; `ffn_dim` is the model's FFN
    size (the experts' default)."""
    strategy = ROUTINGS[str(cfg.moe_routing)]
    num_experts, expert_ffn_dim, sublayers = strategy.expert_layout(cfg, ffn_dim)
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
    return layer_cls(strategy.build(cfg, dim, vocab), experts, num_experts, vocab.padding_idx,
                     cfg.capacity_factor, cfg.eval_capacity_factor, dispatcher)


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    return (m for m in model.modules() if isinstance(m, MoELayer))


def parameter_counts(model: nn.Module) -> Tuple[int, int, int]:
    """(shared, expert, routing) parameters, counted as the paper does (Table 2): routers apart, and a dense
    control's FFN stack shared."""
    expert = routing = 0
    for layer in moe_layers(model):
        routing += sum(p.numel() for p in layer.routing.parameters())
        if not layer.routing.dense:
            expert += sum(p.numel() for p in layer.experts.parameters())
    return sum(p.numel() for p in model.parameters()) - expert - routing, expert, routing


__all__ = [
    "MoEConfig", "MoELayerConfig", "validate_moe_config", "validate_moe_layer_config", "MoELayer", "DecoderMoELayer", "EncoderMoELayer", "Experts",
    "RoutingStrategy", "StableMoERouting", "Vocabulary", "ExpertParallelDispatcher", "build_moe_layer", "moe_layers", "parameter_counts",
    "place_moe_layers",
    "FeedsDecoderTokenIds", "FeedsEncoderTokenIds",
]
