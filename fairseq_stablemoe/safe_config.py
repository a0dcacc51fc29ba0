"""Config strings that fairseq evaluates as Python: accepted only as literals, whatever the model or task.

A checkpoint stores the config it was trained with, and fairseq builds the model (and, in fairseq-eval-lm,
fairseq-generate and our tools, the task) from that stored config. While doing so it passes string fields to
eval(), directly (`eval(args.character_filters)`, `eval(cfg.adam_betas)`) or through utils.eval_str_list /
eval_str_dict / eval_bool. torch's weights-only loader sees only a string, so
`adaptive_softmax_cutoff = "__import__('os').system(...) or [100]"` would run when the model is built. Which field
is evaluated depends on the model and task the *file* names, so nothing here depends on those names:

- EVALUATED_FIELDS is every config field that any of fairseq's code passes to eval() or to its eval_* helpers
  (tests/test_safe_config.py searches all of fairseq's source and fails on a field missing here). Wherever such a
  field appears in a config, at any depth, its string value must be a literal.
- fairseq's eval_str_list / eval_str_dict / eval_bool themselves are replaced at plugin import by versions that
  read literals only (`patch_fairseq_eval`), so a field this list might still miss cannot run code through them.
- OmegaConf resolves `${name:...}` interpolations in a loaded config (e.g. `${oc.env:HOME}`); a checkpoint's
  config may hold plain references (`${checkpoint.save_dir}`, as fairseq stores them) but no resolver call.

"A literal" is what ast.literal_eval reads, and also a literal list or tuple repeated or joined with `*` / `+`
(fairseq's own fconv defaults read `[(512, 3)] * 20`): it is read by walking the syntax tree, never by eval().
`refuse_evaluated_code` is called on every checkpoint's whole config before anything builds from it
(fairseq_stablemoe/checkpoints.py wraps fairseq's loader), and on the command line's config by our tasks.
"""
import argparse
import ast
import re
import sys
from typing import Any, Iterator, Tuple

from omegaconf import OmegaConf

# field name -> where fairseq evaluates it (fairseq 0.12, fairseq/ and fairseq/examples)
EVALUATED_FIELDS = {
    "adaptive_softmax_cutoff": "models/transformer/transformer_decoder.py, lstm*, lightconv, fconv_lm: eval_str_list",
    "adaptive_input_cutoff": "models/transformer_lm.py, lightconv_lm.py: eval_str_list",
    "character_filters": "models/transformer_lm.py, lightconv_lm.py: eval",
    "xformers_att_config": "modules/multihead_attention.py, eval_str_dict (encoder.*, decoder.*)",
    "encoder_xformers_att_config": "modules/multihead_attention.py, eval_str_dict",
    "decoder_xformers_att_config": "modules/multihead_attention.py, eval_str_dict",
    "left_pad_source": "multilingual_data_manager.py, multilingual_translation.py, ...: eval_bool",
    "left_pad_target": "multilingual_data_manager.py, multilingual_translation.py, ...: eval_bool",
    "adam_betas": "optim/adam.py, cpu_adam.py: eval",
    "adamax_betas": "optim/adamax.py: eval",
    "adafactor_eps": "optim/adafactor.py: eval",
    "lamb_betas": "optim/fused_lamb.py: eval",
    "wer_args": "criterions/ctc.py: eval",
    "pipeline_balance": "distributed/utils.py, model_parallel: eval_str_list",
    "pipeline_devices": "distributed/utils.py, model_parallel: eval_str_list",
    "pipeline_encoder_balance": "model_parallel/models/pipeline_parallel_transformer: eval_str_list",
    "pipeline_encoder_devices": "distributed/utils.py, model_parallel: eval_str_list",
    "pipeline_decoder_balance": "model_parallel/models/pipeline_parallel_transformer: eval_str_list",
    "pipeline_decoder_devices": "distributed/utils.py, model_parallel: eval_str_list",
    "encoder_layers": "models/fconv*.py: eval",
    "decoder_layers": "models/fconv*.py: eval",
    "encoder_attention": "models/fconv_self_att.py: eval",
    "decoder_attention": "models/fconv*.py: eval; models/lstm.py: eval_bool",
    "pretrained": "models/fconv_self_att.py: eval",
    "self_attention": "models/fconv_self_att.py: eval",
    "project_input": "models/fconv_self_att.py: eval",
    "gated_attention": "models/fconv_self_att.py: eval",
    "downsample": "models/fconv_self_att.py: eval",
    "conv_feature_layers": "models/wav2vec, hubert, speech_to_text: eval",
    "conv_aggregator_layers": "models/wav2vec/wav2vec.py: eval",
    "feature_encoder_spec": "data/audio/raw_audio_dataset.py, examples/data2vec: eval",
    "decoder_zero_init": "examples/laser: eval_bool",
    "vggblock_enc_config": "examples/speech_recognition: eval",
    "transformer_enc_config": "examples/speech_recognition: eval",
    "transformer_dec_config": "examples/speech_recognition: eval",
    "conv_dec_config": "examples/speech_recognition: eval",
    "conv_enc_config": "examples/speech_recognition: eval",
    "transformer_context": "examples/speech_recognition: eval",
    "transformer_sampling": "examples/speech_recognition: eval",
    "model_overrides": "examples (drnmt_rerank, criss): eval",
    "extra_data": "multilingual_data_manager.py: eval_str_dict",
    "extra_lang_pairs": "multilingual_data_manager.py: eval_str_dict",
    "langtoks": "multilingual_data_manager.py: eval_str_dict",
    "sampling_weights": "multilingual_data_manager.py: eval_str_dict",
}

# `${name:...}`: an OmegaConf resolver call (a plain `${a.b}` reference has no colon before its first `}`)
RESOLVER_CALL = re.compile(r"\$\{\s*[^}:]*:")

_LITERAL_NODES = (ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Set, ast.Load, ast.UnaryOp,
                  ast.USub, ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult)
MAX_REPEAT = 100_000


class UnsafeConfigError(ValueError):
    pass


class NotLiteral(ValueError):
    """literal_value's answer to anything but a literal (caught where it is raised: never shown to a user)"""


def _items(cfg: Any, prefix: str) -> Iterator[Tuple[str, str, Any]]:
    """(dotted path, field name, value) of every entry of a config, nested sections (and lists) included."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    elif isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if isinstance(cfg, (list, tuple)):
        entries = [(f"{prefix}[{i}]", "", v) for i, v in enumerate(cfg)]  # fairseq evaluates no list item
    elif isinstance(cfg, dict):
        entries = [(f"{prefix}.{name}" if prefix else str(name), str(name), v) for name, v in cfg.items()]
    else:
        return
    for path, name, value in entries:
        yield path, name, value
        if isinstance(value, (dict, list, tuple, argparse.Namespace)) or OmegaConf.is_config(value):
            yield from _items(value, path)


def literal_value(value: str) -> Any:
    """The value of a literal (see the module's doc), read without eval(); NotLiteral for anything else."""
    try:
        tree = ast.parse(value.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise NotLiteral from None
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES):
            raise NotLiteral
        if isinstance(node, ast.BinOp):
            counts = [n.value for n in (node.left, node.right) if isinstance(n, ast.Constant)
                      and isinstance(n.value, int)]
            if isinstance(node.op, ast.Mult) and not any(abs(c) <= MAX_REPEAT for c in counts):
                raise NotLiteral

    def value_of(node):
        if isinstance(node, ast.BinOp):
            left, right = value_of(node.left), value_of(node.right)
            return {ast.Add: lambda: left + right, ast.Sub: lambda: left - right,
                    ast.Mult: lambda: left * right}[type(node.op)]()
        if isinstance(node, ast.Expression):
            return value_of(node.body)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = [value_of(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else set(items) if isinstance(node, ast.Set) else items
        if isinstance(node, ast.Dict):
            return {value_of(k): value_of(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.UnaryOp):
            operand = value_of(node.operand)
            return -operand if isinstance(node.op, ast.USub) else +operand
        return node.value

    try:
        return value_of(tree)
    except (TypeError, KeyError, RecursionError, MemoryError, OverflowError):
        raise NotLiteral from None


def is_literal(value: str) -> bool:
    try:
        literal_value(value)
        return True
    except NotLiteral:
        return False


def _shown(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


def refuse_evaluated_code(cfg: Any, section: str = "") -> None:
    """Raise UnsafeConfigError naming the first field fairseq would eval() that holds more than a literal, or the
    first string that asks OmegaConf to call a resolver."""
    for path, name, value in _items(cfg, section):
        if not isinstance(value, str):
            continue
        if name in EVALUATED_FIELDS and not is_literal(value):
            raise UnsafeConfigError(
                f"config field {path} = {_shown(value)!r} is not a Python literal and fairseq passes it to eval() "
                f"when it builds the model: refused, since loading it would run code; use a checkpoint written by "
                f"fairseq-train, or set the field to a literal (e.g. None)")
        if RESOLVER_CALL.search(value):
            raise UnsafeConfigError(
                f"config field {path} = {_shown(value)!r} asks OmegaConf to call a resolver when the config is "
                f"read: refused, since a checkpoint's config must hold values (fairseq stores values and plain "
                f"${{section.field}} references only); use a checkpoint written by fairseq-train")


# --- fairseq's eval_* helpers, reading literals only ---

def safe_eval_str_list(x, type=float):
    if x is None:
        return None
    if isinstance(x, str):
        x = _literal_or_refuse(x)
    try:
        return list(map(type, x))
    except TypeError:
        return [type(x)]


def safe_eval_str_dict(x, type=dict):
    if x is None:
        return None
    if isinstance(x, str):
        x = _literal_or_refuse(x)
    return x


def safe_eval_bool(x, default=False):
    if x is None:
        return default
    try:
        return bool(_literal_or_refuse(x) if isinstance(x, str) else x)
    except TypeError:
        return default


def _literal_or_refuse(x: str):
    try:
        return literal_value(x)
    except NotLiteral:
        raise UnsafeConfigError(
            f"fairseq was asked to evaluate {_shown(x)!r}, which is not a Python literal: refused (with "
            f"--user-dir fairseq_stablemoe, fairseq's eval_str_list / eval_str_dict / eval_bool read literals "
            f"only); give the flag a literal value such as 10000,50000 or True") from None


def patch_fairseq_eval() -> None:
    """Replace fairseq.utils.eval_str_list / eval_str_dict / eval_bool, and every alias of them in fairseq's modules
    already imported (fairseq.options, the multilingual data manager, ...), by the literal-only versions."""
    from fairseq import utils

    originals = {name: getattr(utils, name) for name in ("eval_str_list", "eval_str_dict", "eval_bool")}
    safe = {"eval_str_list": safe_eval_str_list, "eval_str_dict": safe_eval_str_dict, "eval_bool": safe_eval_bool}
    if originals["eval_bool"] is safe_eval_bool:
        return
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "fairseq" or module_name.startswith(("fairseq.", "fairseq_cli"))):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, safe[name])
