"""Warnings that fairseq's own calls into hydra and torch raise at every start-up or step, on every machine, and
that no setting of the user's fixes (deprecated hydra APIs fairseq uses, a CUDA-only option on a CPU).

The plugin filters exactly these messages when it is imported (fairseq imports it through --user-dir before it
composes its config); every other warning still shows. STABLEMOE_ALL_WARNINGS=1 shows these too.
"""
import os
import warnings

NOISE = [
    (UserWarning, r"hydra\.experimental\.(compose|initialize)\(\) is no longer experimental"),
    (UserWarning, r"\s*The version_base parameter is not specified"),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated"),
    (UserWarning, r"In '[^']*': Usage of deprecated keyword in package header '# @package _group_'"),
    (UserWarning, r"\s*'[^']*' is validated against ConfigStore schema with the same name"),
    (UserWarning, r"Future Hydra versions will no longer change working directory at job runtime"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated"),
    (UserWarning, r"Support for mismatched key_padding_mask and attn_mask is deprecated"),
]


def filter_known_noise():
    if os.environ.get("STABLEMOE_ALL_WARNINGS"):
        return
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
