"""Each dictionary's fingerprint, stored in the checkpoint and checked wherever a checkpoint meets data.

A dictionary of the same size in another order (the data binarised again) passes every shape check, yet every
token id now names another word, and a frozen token -> expert table routes other words. The task stores a
fingerprint of each of its dictionaries (symbols in id order) in its state, which fairseq saves in every
checkpoint ("task_state"); resuming, fairseq-eval-lm and fairseq-generate compare it with the dictionaries
loaded from the data directory.
"""
import hashlib
import logging
import os
from typing import Dict, Optional

logger = logging.getLogger(__name__)

STATE_KEY = "stablemoe_dictionaries"


def fingerprint(dictionary) -> str:
    """Size and sha256 of the symbols in id order (counts are left out: they do not change what an id means)."""
    digest = hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()[:16]
    return f"{len(dictionary.symbols)} symbols, sha256 {digest}"


def task_dictionaries(task) -> Dict[str, tuple]:
    """{file name: (path, dictionary)} of the task's dictionaries as fairseq-preprocess names them."""
    cfg = getattr(task, "args", None) or task.cfg
    data = str(cfg.data).split(os.pathsep)[0]
    if getattr(task, "dicts", None):  # translation_multi_simple_epoch: one per language
        return {f"dict.{lang}.txt": (os.path.join(data, f"dict.{lang}.txt"), d) for lang, d in task.dicts.items()}
    return {"dict.txt": (os.path.join(data, "dict.txt"), task.source_dictionary or task.target_dictionary)}


def task_fingerprints(task) -> Dict[str, str]:
    return {name: fingerprint(d) for name, (_, d) in task_dictionaries(task).items()}


def check_fingerprints(task, task_state: Optional[dict], checkpoint: str = "the checkpoint") -> None:
    """Refuse a dictionary that is not the checkpoint's; warn when the checkpoint predates fingerprints."""
    saved = (task_state or {}).get(STATE_KEY)
    mine = task_dictionaries(task)
    if saved is None:
        paths = ", ".join(path for path, _ in mine.values())
        logger.warning(f"{checkpoint} holds no dictionary fingerprint (written before they were stored): cannot "
                       f"check that {paths} is the dictionary it was trained with; if the data was binarised again "
                       f"since, token ids may name other words")
        return
    for name, (path, dictionary) in mine.items():
        if name in saved and saved[name] != fingerprint(dictionary):
            raise ValueError(
                f"{path} is not the dictionary {checkpoint} was trained with ({fingerprint(dictionary)}; the "
                f"checkpoint's: {saved[name]}), so token ids would name other words: pass the data directory "
                f"the model was trained on, or binarise this data with the training dictionary "
                f"(fairseq-preprocess --srcdict <training data>/{name})")
