"""Where MoE layers go in a stack of Transformer blocks, how they get the token ids, and how their aux leaves.

fairseq's layer loops pass each layer only the hidden states. A stack's forward (`stack_forward`) hands its
token ids to its MoE layers for exactly the duration of that forward, and collects the aux of each of them (a
layer skipped by --decoder-layerdrop reports zeros): the stack returns it in its output, as
`extra["moe_aux"]` (decoder) and `encoder_out["moe_aux"]` (encoder; the decoder adds it to its own).
"""
import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .layer import MoELayer

MoEAux = Dict[MoELayer, Dict[str, torch.Tensor]]  # per MoE layer, in the model's order: its aux (MoELayer.report)


class StackForward:
    """One forward of a stack of blocks: its token ids (B x S, the whole prefix, also in incremental decoding,
    where each layer picks the positions it routes) and the aux its MoE layers report."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.aux: MoEAux = {}


@contextlib.contextmanager
def stack_forward(layers: nn.ModuleList, tokens: torch.Tensor):
    scope = StackForward(tokens)
    # children(), not iteration: fairseq's LayerDropModuleList iterates a random subset
    placed = [layer for layer in layers.children() if isinstance(layer, StackedMoELayer)]
    for layer in placed:
        layer.stack = scope
    try:
        yield scope
    finally:
        for layer in placed:
            layer.stack = None
    # every MoE layer of the stack, in order: a layer that layerdrop skipped reports zeros
    scope.aux = {layer: scope.aux.get(layer) or layer.report({}, ran=False) for layer in placed}


class StackedMoELayer(MoELayer):
    """An MoE layer among a stack's blocks: its token ids come from the stack's forward, its aux goes back there."""

    stack: Optional[StackForward] = None

    def stack_tokens(self) -> torch.Tensor:
        if self.stack is None:
            raise RuntimeError("MoELayer needs the token ids: the model sets them before each forward")
        return self.stack.tokens

    def forward_in_stack(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = MoELayer.forward(self, x, self.stack_tokens())
        self.stack.aux[self] = self.report(aux, ran=True)
        return y


class DecoderMoELayer(StackedMoELayer):
    """An MoE layer in fairseq's decoder loop, which expects (x, attn, _) from every layer."""

    def forward(self, x, *args, **kwargs):
        return self.forward_in_stack(x), None, None


class EncoderMoELayer(StackedMoELayer):
    """An MoE layer in fairseq's encoder loop, which passes the padding mask positionally."""

    def forward(self, x, *args, **kwargs):
        return self.forward_in_stack(x)

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


class FeedsDecoderTokenIds:
    """Mix into a fairseq decoder before the decoder class. extract_features is where both `decoder(...)` and
    the direct `decoder.forward(...)` of fairseq's sequence generator pass (a forward hook would miss the latter).
    Its `extra` gets "moe_aux": the encoder's MoE layers' aux and then the decoder's."""

    def extract_features(self, prev_output_tokens, *args, **kwargs):
        check_token_ids(prev_output_tokens, self.embed_tokens.num_embeddings)
        with stack_forward(self.layers, prev_output_tokens) as scope:
            x, extra = super().extract_features(prev_output_tokens, *args, **kwargs)
        encoder_out = args[0] if args else kwargs.get("encoder_out")
        extra["moe_aux"] = {**(encoder_out or {}).get("moe_aux", {}), **scope.aux}
        return x, extra


class FeedsEncoderTokenIds:
    """Mix into a fairseq encoder before the encoder class (forward_scriptable: every encoder path passes it)."""

    def forward_scriptable(self, src_tokens, *args, **kwargs):
        check_token_ids(src_tokens, self.embed_tokens.num_embeddings)
        with stack_forward(self.layers, src_tokens) as scope:
            encoder_out = super().forward_scriptable(src_tokens, *args, **kwargs)
        encoder_out["moe_aux"] = scope.aux
        return encoder_out
