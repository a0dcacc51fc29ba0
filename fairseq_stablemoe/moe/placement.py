"""Where MoE layers go in a stack of Transformer blocks, and how they get the token ids."""
from typing import List

import torch
import torch.nn as nn

from .layer import MoELayer


class DecoderMoELayer(MoELayer):
    """An MoE layer in fairseq's decoder loop, which expects (x, attn, _) from every layer."""

    def forward(self, x, *args, **kwargs):
        return super().forward(x), None, None


class EncoderMoELayer(MoELayer):
    """An MoE layer in fairseq's encoder loop, which passes the padding mask positionally."""

    def forward(self, x, *args, **kwargs):
        return super().forward(x)

    def upgrade_state_dict_named(self, state_dict, name):
        """fairseq's encoder calls this on each of its layers when loading a checkpoint; nothing to upgrade."""


def insert_positions(num_blocks: int, num_moe: int, position: str) -> List[int]:
    """Block count before each MoE layer: stacked at one place, or one after evenly spaced blocks."""
    position = str(position)
    if position == "scattered":
        return [(i + 1) * num_blocks // (num_moe + 1) for i in range(num_moe)]
    at = {"bottom": 0, "middle": num_blocks // 2, "top": num_blocks}[position]
    return [at] * num_moe


def place_moe_layers(layers: nn.ModuleList, moe_layers: List[MoELayer], position: str):
    """Insert `moe_layers` among the blocks of `layers` (in place)."""
    blocks = len(layers)
    for i, at in reversed(list(enumerate(insert_positions(blocks, len(moe_layers), position)))):
        layers.insert(at, moe_layers[i])


def check_token_ids(tokens: torch.Tensor, vocab_size: int):
    """Before the embedding sees them: an id past the table is a bare IndexError on CPU and a device-side
    assert on GPU; routers index tables of the same size."""
    outside = (tokens >= vocab_size) | (tokens < 0)
    if outside.any():  # one host sync per stack forward
        bad = tokens[outside][0]
        raise ValueError(
            f"token id {int(bad)} is outside the model's dictionary (0..{vocab_size - 1}): the data was binarized "
            f"with another dictionary than the model's; binarize it with the model's dict.txt "
            f"(fairseq-preprocess --srcdict)")


def feed_token_ids(layers: nn.ModuleList, tokens):
    """Hand a stack's input token ids to its MoE layers: the whole prefix, also in incremental decoding,
    where each layer picks the positions it routes."""
    for layer in layers:
        if isinstance(layer, MoELayer):
            layer.route_tokens = tokens


class FeedsDecoderTokenIds:
    """Mix into a fairseq decoder before the decoder class. extract_features is where both `decoder(...)` and
    the direct `decoder.forward(...)` of fairseq's sequence generator pass (a forward hook would miss the latter)."""

    def extract_features(self, prev_output_tokens, *args, **kwargs):
        check_token_ids(prev_output_tokens, self.embed_tokens.num_embeddings)
        feed_token_ids(self.layers, prev_output_tokens)
        return super().extract_features(prev_output_tokens, *args, **kwargs)


class FeedsEncoderTokenIds:
    """Mix into a fairseq encoder before the encoder class (forward_scriptable: every encoder path passes it)."""

    def forward_scriptable(self, src_tokens, *args, **kwargs):
        check_token_ids(src_tokens, self.embed_tokens.num_embeddings)
        feed_token_ids(self.layers, src_tokens)
        return super().forward_scriptable(src_tokens, *args, **kwargs)
