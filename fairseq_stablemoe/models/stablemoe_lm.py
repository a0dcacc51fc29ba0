"""`stablemoe_lm`: fairseq's transformer_lm with MoE layers placed between its blocks."""
from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from ..moe import DecoderMoELayer, FeedsDecoderTokenIds, MoEConfig, MoESettings, Vocabulary, build_moe_layer, \
    place_moe_layers
from ..checks.preflight import check_model_config
from .common import MoEModelMixin, set_defaults


@dataclass
class StableMoELanguageModelConfig(TransformerLanguageModelConfig, MoEConfig):
    pass


class StableMoELMDecoder(FeedsDecoderTokenIds, TransformerDecoder):
    """fairseq's decoder with MoE layers placed among its blocks."""

    def __init__(self, args, dictionary, embed_tokens, settings: MoESettings):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=True)
        (placement,) = settings.placements
        layers = [
            build_moe_layer(settings, args.decoder_embed_dim, args.decoder_ffn_embed_dim, Vocabulary.of(dictionary),
                            args.activation_fn, DecoderMoELayer)
            for _ in range(placement.layers)
        ]
        place_moe_layers(self.layers, layers, placement.position)


@register_model("stablemoe_lm", dataclass=StableMoELanguageModelConfig)
class StableMoELanguageModel(MoEModelMixin, TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        check_model_config(args, task)  # before fairseq evaluates any of its fields
        settings = MoESettings.of(args)
        settings.check_placements({"decoder": args.decoder_layers})
        # fairseq's transformer_lm builds the embeddings (plain, adaptive or character); we keep them and
        # replace its decoder by ours, which only adds MoE layers
        embed_tokens = super().build_model(args, task).decoder.embed_tokens
        return cls(StableMoELMDecoder(args, task.target_dictionary, embed_tokens, settings))



@register_model_architecture("stablemoe_lm", "stablemoe_lm_base")
def stablemoe_lm_base(args):
    """Paper Table 7, base: 12 × 768/3072, 12 heads, one MoE layer of 32 experts × 3 sublayers in the middle."""
    set_defaults(
        args, decoder_embed_dim=768, decoder_ffn_embed_dim=3072, decoder_layers=12, decoder_attention_heads=12,
        decoder_learned_pos=True, decoder_normalize_before=True, share_decoder_input_output_embed=True,
        dropout=0.0, attention_dropout=0.0, activation_fn="relu",
        moe_layers=1, moe_position="middle", moe_experts=32, moe_sublayers=3,
    )
    base_lm_architecture(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_large")
def stablemoe_lm_large(args):
    """Paper Table 7, large: 24 × 1024/4096, 16 heads, one MoE layer of 64 experts × 6 sublayers."""
    set_defaults(args, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_layers=24,
                  decoder_attention_heads=16, moe_experts=64, moe_sublayers=6)
    stablemoe_lm_base(args)


@register_model_architecture("stablemoe_lm", "stablemoe_lm_tiny")
def stablemoe_lm_tiny(args):
    """A CPU-sized model for demos and tests: 4 × 128/512, 8 experts × 2 sublayers."""
    set_defaults(args, decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_layers=4,
                  decoder_attention_heads=4, moe_experts=8, moe_sublayers=2)
    stablemoe_lm_base(args)
