"""The MoE layer: routing strategies, experts, dispatch, and where layers go in a model (the export list)."""
from .build import build_moe_layer, parameter_counts
from .config import MoEConfig, MoELayerConfig, MoESettings
from .dispatch import ExpertParallelDispatcher
from .experts import Experts
from .layer import MoELayer, moe_layers
from .placement import (
    DecoderMoELayer, EncoderMoELayer, FeedsDecoderTokenIds, FeedsEncoderTokenIds, place_moe_layers,
)
from .routing import ROUTINGS, RoutingStrategy, StableMoERouting, Vocabulary

__all__ = [
    "MoEConfig", "MoELayerConfig", "MoESettings", "MoELayer", "DecoderMoELayer", "EncoderMoELayer", "Experts",
    "RoutingStrategy", "StableMoERouting", "Vocabulary", "ExpertParallelDispatcher", "build_moe_layer",
    "moe_layers", "parameter_counts", "place_moe_layers", "FeedsDecoderTokenIds", "FeedsEncoderTokenIds", "ROUTINGS",
]
