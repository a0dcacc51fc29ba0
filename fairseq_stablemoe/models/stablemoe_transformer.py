"""`stablemoe_transformer`: fairseq's encoder-decoder transformer with MoE layers placed in both stacks.

An encoder MoE layer routes by the source token ids (language tag included), a decoder MoE layer by the
decoder's input ids (the whole prefix, also in incremental decoding).
"""
import dataclasses
from dataclasses import dataclass, field

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerModel, base_architecture
from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase
from fairseq.models.transformer.transformer_encoder import TransformerEncoderBase

from ..moe import (
    DecoderMoELayer, EncoderMoELayer, FeedsDecoderTokenIds, FeedsEncoderTokenIds, MoELayer, MoELayerConfig,
    MoESettings, Vocabulary, build_moe_layer, place_moe_layers,
)
from ..checks.preflight import check_model_config
from ..options import option
from ..moe.config import MOE_POSITIONS
from .common import MoEModelMixin, set_defaults


@dataclass
class TranslationMoEConfig(MoELayerConfig):
    """The MoE layer, and a layer count and position per stack (stablemoe_lm has --moe-layers/--moe-position)."""

    encoder_moe_layers: int = field(default=1, metadata={"help": "MoE layers in the encoder (0 = none)"})
    encoder_moe_position: MOE_POSITIONS = field(
        default="middle", metadata={"help": "where the encoder MoE layers go (as --moe-position of stablemoe_lm)"})
    decoder_moe_layers: int = field(default=1, metadata={"help": "MoE layers in the decoder (0 = none)"})
    decoder_moe_position: MOE_POSITIONS = field(
        default="middle", metadata={"help": "where the decoder MoE layers go (as --moe-position of stablemoe_lm)"})


class StableMoETransformerEncoder(FeedsEncoderTokenIds, TransformerEncoderBase):
    """fairseq's encoder; its MoE layers route by the source token ids."""


class StableMoETransformerDecoder(FeedsDecoderTokenIds, TransformerDecoderBase):
    """fairseq's decoder; its MoE layers route by the decoder's input ids (the whole prefix)."""


@register_model("stablemoe_transformer")
class StableMoETransformerModel(MoEModelMixin, TransformerModel):
    @staticmethod
    def add_args(parser):
        TransformerModel.add_args(parser)
        gen_parser_from_dataclass(parser, TranslationMoEConfig(), delete_default=True)

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return StableMoETransformerEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return StableMoETransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    @classmethod
    def build_model(cls, args, task):
        check_model_config(args, task)  # before fairseq evaluates any of its fields
        stablemoe_transformer(args)
        settings = MoESettings.of(args)
        settings.check_placements({"encoder": args.encoder_layers, "decoder": args.decoder_layers})
        model = super().build_model(args, task)
        stacks = {"encoder": (model.encoder, task.source_dictionary, EncoderMoELayer),
                  "decoder": (model.decoder, task.target_dictionary, DecoderMoELayer)}
        for placement in settings.placements:
            side = placement.side
            stack, dictionary, layer_cls = stacks[side]
            dim, ffn_dim = option(args, f"{side}_embed_dim"), option(args, f"{side}_ffn_embed_dim")
            layers = [build_moe_layer(settings, dim, ffn_dim, Vocabulary.of(dictionary), args.activation_fn,
                                      layer_cls) for _ in range(placement.layers)]
            place_moe_layers(stack.layers, layers, placement.position)
        # fairseq takes attention alignment from layers[num_layers - 1]: keep that the last real block
        blocks = [i for i, layer in enumerate(model.decoder.layers.children()) if not isinstance(layer, MoELayer)]
        model.decoder.num_layers = blocks[-1] + 1
        model.encoder.num_layers = len(model.encoder.layers)  # its checkpoint upgrade visits every entry
        return model



@register_model_architecture("stablemoe_transformer", "stablemoe_transformer")
def stablemoe_transformer(args):
    """fairseq's transformer defaults; one MoE layer after the middle block of each stack."""
    set_defaults(args, **{f.name: f.default for f in dataclasses.fields(TranslationMoEConfig)})
    base_architecture(args)


@register_model_architecture("stablemoe_transformer", "stablemoe_transformer_wmt10")
def stablemoe_transformer_wmt10(args):
    """Paper Table 8: 6+6 blocks of 512/2048, 8 heads; MoE after the 3rd encoder and the 3rd decoder block,
    32 experts × 3 sublayers; dropout 0.1, attention dropout 0."""
    set_defaults(
        args, encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6, encoder_attention_heads=8,
        decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_layers=6, decoder_attention_heads=8,
        dropout=0.1, attention_dropout=0.0,
        encoder_moe_layers=1, encoder_moe_position="middle", decoder_moe_layers=1, decoder_moe_position="middle",
        moe_experts=32, moe_sublayers=3,
    )
    stablemoe_transformer(args)


@register_model_architecture("stablemoe_transformer", "stablemoe_transformer_tiny")
def stablemoe_transformer_tiny(args):
    """A CPU-sized model for demos and tests: 2+2 blocks of 64/256, 4 heads, 8 experts × 2 sublayers."""
    set_defaults(
        args, encoder_embed_dim=64, encoder_ffn_embed_dim=256, encoder_layers=2, encoder_attention_heads=4,
        decoder_embed_dim=64, decoder_ffn_embed_dim=256, decoder_layers=2, decoder_attention_heads=4,
        moe_experts=8, moe_sublayers=2,
    )
    stablemoe_transformer_wmt10(args)
