"""The MoE layer: routing strategies, experts, dispatch, and where layers go in a model."""
from typing import Iterator, Type

import torch.nn as nn

from .config import MoEConfig, validate_moe_config
from .experts import Experts
from .layer import MoELayer
from .placement import (
    DecoderMoELayer, EncoderMoELayer, FeedsDecoderTokenIds, FeedsEncoderTokenIds, place_moe_layers,
)
from .routing import ROUTINGS, StableMoERouting


def build_routing(cfg, dim: int, vocab_size: int, padding_idx: int) -> nn.Module:
    return ROUTINGS[str(cfg.moe_routing)].build(cfg, dim, vocab_size, padding_idx)


def build_moe_layer(cfg, dim: int, ffn_dim: int, dictionary, activation: str = "relu",
                    layer_cls: Type[MoELayer] = MoELayer) -> MoELayer:
    experts = Experts(range(cfg.moe_experts), dim, cfg.moe_ffn_embed_dim or ffn_dim, cfg.moe_sublayers,
                      activation)
    routing = build_routing(cfg, dim, len(dictionary), dictionary.pad())
    return layer_cls(routing, experts, cfg.moe_experts, dictionary.pad(),
                     cfg.capacity_factor, cfg.eval_capacity_factor)


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    return (m for m in model.modules() if isinstance(m, MoELayer))


__all__ = [
    "MoEConfig", "validate_moe_config", "MoELayer", "DecoderMoELayer", "EncoderMoELayer", "Experts",
    "StableMoERouting", "build_moe_layer", "moe_layers", "place_moe_layers", "FeedsDecoderTokenIds",
    "FeedsEncoderTokenIds",
]
