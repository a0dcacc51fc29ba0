"""Config fields that fairseq evaluates as Python: accepted only as literals.

A checkpoint stores the config it was trained with, and fairseq builds the model (and, in fairseq-eval-lm and
our tools, the task) from that stored config. While doing so it passes a few string fields to eval() (directly,
or through utils.eval_str_list / eval_str_dict / eval_bool). torch's weights-only loader sees only a string, so
`adaptive_softmax_cutoff = "__import__('os').system(...) or [100]"` would run when the model is built. Every value
fairseq itself writes there is a literal ("10000,50000", "[(1, 64), (2, 128)]", "True"), so we accept a string in
one of these fields only when ast.literal_eval reads it, and refuse the config otherwise, naming the field.

EVALUATED_FIELDS is every such field on the build paths of our models and tasks (fairseq 0.12: transformer_lm,
transformer encoder/decoder, multihead attention, the multilingual data manager); tests/test_safe_config.py
searches fairseq's source for eval calls on those paths and fails on a field missing here.
"""
import argparse
import ast
from typing import Any, Iterator, Tuple

from omegaconf import OmegaConf

# field name -> where fairseq evaluates it
EVALUATED_FIELDS = {
    "adaptive_softmax_cutoff": "models/transformer/transformer_decoder.py, eval_str_list",
    "adaptive_input_cutoff": "models/transformer_lm.py, eval_str_list",
    "character_filters": "models/transformer_lm.py, eval",
    "xformers_att_config": "modules/multihead_attention.py, eval_str_dict (encoder.*, decoder.*)",
    "encoder_xformers_att_config": "modules/multihead_attention.py, eval_str_dict",
    "decoder_xformers_att_config": "modules/multihead_attention.py, eval_str_dict",
    "left_pad_source": "data/multilingual/multilingual_data_manager.py, eval_bool",
    "left_pad_target": "data/multilingual/multilingual_data_manager.py, eval_bool",
}


class UnsafeConfigError(ValueError):
    pass


def _items(cfg: Any, prefix: str) -> Iterator[Tuple[str, str, Any]]:
    """(dotted path, field name, value) of every entry of a config, nested sections included."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    elif isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if not isinstance(cfg, dict):
        return
    for name, value in cfg.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        yield path, str(name), value
        if isinstance(value, (dict, argparse.Namespace)) or OmegaConf.is_config(value):
            yield from _items(value, path)


def is_literal(value: str) -> bool:
    try:
        ast.literal_eval(value)
        return True
    except Exception:  # SyntaxError, ValueError, and RecursionError/MemoryError on hostile input alike
        return False


def refuse_evaluated_code(cfg: Any, section: str = "") -> None:
    """Raise UnsafeConfigError naming the first field fairseq would eval() that holds more than a literal."""
    for path, name, value in _items(cfg, section):
        if name in EVALUATED_FIELDS and isinstance(value, str) and not is_literal(value):
            shown = value if len(value) <= 60 else value[:57] + "..."
            raise UnsafeConfigError(
                f"config field {path} = {shown!r} is not a Python literal and fairseq passes it to eval() when it "
                f"builds the model: refused, since loading it would run code; use a checkpoint written by "
                f"fairseq-train, or set the field to a literal (e.g. None)")
