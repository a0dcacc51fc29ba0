"""Building an MoE layer from the typed settings, and counting a model's parameters as the paper does."""
import logging
from typing import Tuple, Type

import torch
import torch.nn as nn

from . import comm
from .config import MoESettings
from .dispatch import ExpertParallelDispatcher
from .expert_parallel import expert_shard, tag_expert_parameters
from .experts import Experts
from .layer import MoELayer, moe_layers
from .routing import ROUTINGS, Vocabulary

logger = logging.getLogger(__name__)


def build_moe_layer(cfg, dim: int, ffn_dim: int, vocab: Vocabulary, activation: str = "relu",
                    layer_cls: Type[MoELayer] = MoELayer) -> MoELayer:
    """An MoE layer for hidden states of size `dim` whose tokens are ids of `vocab`; `ffn_dim` is the model's FFN
    size (the experts' default). `cfg`: MoESettings, or a config it is made of."""
    settings = MoESettings.of(cfg)
    num_experts, expert_ffn_dim, sublayers = settings.expert_layout(ffn_dim)
    world = settings.expert_parallel_world(comm.world_size(), warn=True)
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
    routing = ROUTINGS[settings.moe_routing].build(settings, dim, vocab)
    return layer_cls(routing, experts, num_experts, vocab.padding_idx, settings.capacity_factor,
                     settings.eval_capacity_factor, dispatcher)


def parameter_counts(model: nn.Module) -> Tuple[int, int, int]:
    """(shared, expert, routing) parameters, counted as the paper does (Table 2): routers apart, and a dense
    control's FFN stack shared."""
    expert = routing = 0
    for layer in moe_layers(model):
        routing += sum(p.numel() for p in layer.routing.parameters())
        if not layer.routing.dense:
            expert += sum(p.numel() for p in layer.experts.parameters())
    return sum(p.numel() for p in model.parameters()) - expert - routing, expert, routing
