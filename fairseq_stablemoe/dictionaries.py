"""Each dictionary's fingerprint, stored in the checkpoint and checked wherever a checkpoint meets data.

A dictionary of the same size in another order (the data binarised again) passes every shape check, yet every
token id now names another word, and a frozen token -> expert table routes other words. fairseq-train stores
a fingerprint of each dictionary (its symbols in id order) in the model's config (--dictionary-fingerprints,
set by our task), which every checkpoint holds; building the model from a checkpoint (fairseq-eval-lm,
fairseq-generate, our tools, under any task) and resuming compare it with the dictionaries the task loaded.
"""
import hashlib
import json
import logging
import os
from typing import Dict, Optional

from .options import option, task_config

logger = logging.getLogger(__name__)


def fingerprint(dictionary) -> str:
    """Size and sha256 of the symbols in id order (counts are left out: they do not change what an id means)."""
    digest = hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()[:16]
    return f"{len(dictionary.symbols)} symbols, sha256 {digest}"


def task_dictionaries(task) -> Dict[str, tuple]:
    """{file name: (path, dictionary)} of the task's dictionaries as fairseq-preprocess names them; {} for a task
    without a data directory (a model built by hand)."""
    cfg = task_config(task)
    data = option(cfg, "data")
    if not isinstance(data, str):
        return {}
    data = data.split(os.pathsep)[0]
    if getattr(task, "dicts", None):  # translation_multi_simple_epoch: one per language
        fixed = option(cfg, "fixed_dictionary")
        return {f"dict.{lang}.txt": (fixed or os.path.join(data, f"dict.{lang}.txt"), d)
                for lang, d in task.dicts.items()}
    return {"dict.txt": (os.path.join(data, "dict.txt"), task.source_dictionary or task.target_dictionary)}


def task_fingerprints(task) -> Optional[str]:
    """What --dictionary-fingerprints holds: a JSON object {file name: fingerprint}."""
    found = task_dictionaries(task)
    return json.dumps({name: fingerprint(d) for name, (_, d) in found.items()}, sort_keys=True) if found else None


def check_fingerprints(task, saved: Optional[str], checkpoint: str = "the checkpoint") -> None:
    """Refuse a dictionary that is not the checkpoint's; warn when the checkpoint predates fingerprints."""
    mine = task_dictionaries(task)
    if not mine:
        return
    if not saved:
        paths = ", ".join(path for path, _ in mine.values())
        logger.warning(f"{checkpoint} holds no dictionary fingerprint (written before they were stored): cannot "
                       f"check that {paths} is the dictionary it was trained with; if the data was binarised again "
                       f"since, token ids may name other words")
        return
    saved = json.loads(saved)
    for name, (path, dictionary) in mine.items():
        if name in saved and saved[name] != fingerprint(dictionary):
            raise ValueError(
                f"{path} is not the dictionary {checkpoint} was trained with ({fingerprint(dictionary)}; the "
                f"checkpoint's: {saved[name]}), so token ids would name other words: pass the data directory "
                f"the model was trained on, or binarise this data with the training dictionary "
                f"(fairseq-preprocess --srcdict <training data>/{name})")
