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
    if tokens.numel() and (tokens.max() >= vocab_size or tokens.min() < 0):
        bad = tokens[(tokens >= vocab_size) | (tokens < 0)][0]
        raise ValueError(
            f"token id {int(bad)} is outside the model's dictionary (0..{vocab_size - 1}): the data was binarized "
            f"with another dictionary than the model's; binarize it with the model's dict.txt "
            f"(fairseq-preprocess --srcdict)")


def feed_token_ids(stack: nn.Module, moe_layers: List[MoELayer], tokens_arg: str):
    """Before each forward of `stack` (a fairseq encoder or decoder), hand its token ids to its MoE layers.

    The ids are the whole prefix even in incremental decoding; each layer picks its own positions.
    """

    vocab_size = stack.embed_tokens.num_embeddings

    def hook(module, args, kwargs):
        tokens = args[0] if args else kwargs[tokens_arg]
        check_token_ids(tokens, vocab_size)
        for layer in moe_layers:
            layer.route_tokens = tokens

    stack.register_forward_pre_hook(hook, with_kwargs=True)
