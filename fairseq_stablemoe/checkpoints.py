"""Safe and robust loading of fairseq checkpoints.

Safe: on torch >= 2.6, torch.load defaults to weights_only=True. fairseq >= 0.12 stores only tensors,
dicts, lists and numbers; older fairseq also stored its argparse.Namespace `args`. We allow exactly
that class, so fairseq-eval-lm / fairseq-generate load any fairseq checkpoint with nothing set by the
user, while every other pickled object (a function, an arbitrary class) is refused by torch's
weights-only unpickler before it runs. Training refuses such a file itself, with a clearer message.

Robust: fairseq writes the first checkpoint of a save atomically (a .tmp file, then a rename) but
*copies* it to checkpoint_last.pt / checkpoint_best.pt with a plain, non-atomic file copy. A run killed
during that copy leaves a truncated checkpoint_last.pt, and the next launch would fail to resume.
`prepare_resume` repairs that before fairseq loads it: the copy's source is the newest intact file beside it.
"""
import argparse
import collections
import glob
import logging
import os
import shutil
import typing
import zipfile
from typing import List, Optional

import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

logger = logging.getLogger(__name__)

# Namespace: old-style `args`. The rest: what fairseq pickles when rank 0 broadcasts a loaded checkpoint to
# the other ranks (resuming with several processes): the omegaconf config and tensor placeholders.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
                              typing.Any, collections.defaultdict, dict, list, int, _TensorPlaceholder]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


# torch.save's legacy (pre-zip) format starts by pickling this magic number (protocol 2)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class CheckpointError(ValueError):
    pass


def is_intact(path: str) -> bool:
    """A torch zip checkpoint whose central directory (written last) is there: not truncated."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
            if head[:4] != b"PK\x03\x04":
                return head == LEGACY_MAGIC  # torch's legacy (pre-zip) format; anything else is not a checkpoint
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def unsafe_globals(path: str) -> List[str]:
    """Pickled classes/functions in `path` that neither torch nor our allow-list accepts."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return []  # torch < 2.5 has no weights-only default to satisfy
    return torch.serialization.get_unsafe_globals_in_checkpoint(path)


def check_checkpoint(path: str, flag: str = "--restore-file") -> None:
    """Raise a CheckpointError naming the problem and the fix if fairseq could not safely load `path`."""
    if os.path.isdir(path):
        raise CheckpointError(f"{flag} {path} is a directory: name a checkpoint file in it, e.g. "
                              f"{flag} {os.path.join(path, 'checkpoint_last.pt')}")
    if not os.path.exists(path):
        raise CheckpointError(f"{flag} {path} does not exist")
    if not is_intact(path):
        raise CheckpointError(
            f"{flag} {path} is truncated or not a checkpoint ({os.path.getsize(path)} bytes, no zip central "
            f"directory): resume from an intact checkpoint, e.g. {flag} {newest_intact(os.path.dirname(path)) or '…'}")
    unsafe = unsafe_globals(path)
    if unsafe:
        raise CheckpointError(
            f"{flag} {path} holds pickled objects other than tensors and fairseq's settings ({', '.join(unsafe)}); "
            f"we refuse arbitrary pickles because loading them can run code: use a checkpoint written by "
            f"fairseq-train")


def checkpoint_files(save_dir: str) -> List[str]:
    return [p for p in glob.glob(os.path.join(save_dir, "checkpoint*.pt")) if os.path.isfile(p)]


def newest_intact(save_dir: str, exclude: Optional[str] = None) -> Optional[str]:
    candidates = [p for p in checkpoint_files(save_dir) if p != exclude and is_intact(p)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def recover_truncated(path: str) -> str:
    """Replace a truncated copy (checkpoint_last/best) with the newest intact checkpoint beside it, atomically."""
    source = newest_intact(os.path.dirname(path) or ".", exclude=path)
    if source is None:
        raise CheckpointError(f"{path} is truncated and no intact checkpoint is beside it: restart training "
                              f"without it (move it away) or pass --restore-file with an intact checkpoint")
    tmp = f"{path}.recover-{os.getpid()}"
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    logger.warning(f"{path} was truncated (the run was killed while fairseq copied a checkpoint); "
                   f"replaced it with {source}, the newest intact checkpoint, and resuming from there")
    return source


def prepare_resume(save_dir: str, restore_file: str) -> Optional[str]:
    """Before fairseq-train loads its checkpoint: repair truncated copies (checkpoint_last.pt, checkpoint_best.pt),
    refuse a bad --restore-file or checkpoint_last.pt. Returns the path fairseq will load (None when it starts from scratch)."""
    if restore_file == "checkpoint_last.pt":
        # only copies (last, best) can be truncated: the files fairseq writes first are renamed into place
        for path in checkpoint_files(save_dir):
            if not is_intact(path):
                recover_truncated(path)
        path = os.path.join(save_dir, restore_file)
        if not os.path.exists(path):
            return None
        check_checkpoint(path, flag="checkpoint")
        return path
    if not os.path.exists(restore_file):
        # fairseq would silently train from scratch
        raise CheckpointError(f"--restore-file {restore_file} does not exist; fix the path, or drop the flag "
                              f"to resume from {os.path.join(save_dir, 'checkpoint_last.pt')}")
    check_checkpoint(restore_file)
    return restore_file


def load_checked(path: str, arg_overrides=None, flag: str = "--path") -> dict:
    """A checkpoint for our tools: refused if unsafe (pickles, or code in a field fairseq evaluates)."""
    from fairseq import checkpoint_utils

    from .safe_config import refuse_evaluated_code

    check_checkpoint(path, flag)
    state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    refuse_evaluated_code(state.get("cfg") or {"model": state.get("args")}, "")
    return state
