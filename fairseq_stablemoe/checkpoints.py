"""Safe and robust loading of fairseq checkpoints.

Safe: on torch >= 2.6, torch.load defaults to weights_only=True. fairseq >= 0.12 stores only tensors,
dicts, lists and numbers; older fairseq also stored its argparse.Namespace `args`. We allow exactly
that class, so fairseq-eval-lm / fairseq-generate load any fairseq checkpoint with nothing set by the
user, while every other pickled object (a function, an arbitrary class) is refused by torch's
weights-only unpickler before it runs. Training refuses such a file itself, with a clearer message.

Checked on every load: importing the plugin wraps fairseq's checkpoint_utils.load_checkpoint_to_cpu, the one
function through which fairseq-eval-lm, fairseq-generate, fairseq-train (--restore-file, resuming,
--finetune-from-model), from_pretrained and our tools read a checkpoint. Before fairseq reads it: the file must
be a checkpoint (not a directory, not cut short), its zip's CRC-32 checksums must match its bytes (a flipped bit
is refused, not loaded), it must hold no pickled object outside the allow-list, and its whole stored config is
checked by safe_config.refuse_evaluated_code, whatever model and task it names. After: every floating-point model
weight must be finite (NaN or inf is refused, naming the tensor).

Robust: fairseq writes the first checkpoint of a save atomically (a .tmp file, then a rename) but
*copies* it to checkpoint_last.pt / checkpoint_best.pt (and further names of the same save) with a plain,
non-atomic file copy. A run killed during that copy leaves a truncated copy, and the next launch would fail to
resume. `prepare_resume` repairs that before fairseq loads it. It looks only at the files fairseq names
(checkpoint_last.pt, checkpoint_best.pt, checkpointN.pt, checkpoint_E_U.pt), chooses the source by the update
count stored inside (never by the files' dates), moves a damaged file aside instead of overwriting it, and says
what it did.
"""
import argparse
import collections
import functools
import glob
import logging
import os
import re
import shutil
import typing
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from .atomic import move_aside
from .options import option

logger = logging.getLogger(__name__)

# Namespace: old-style `args`. The rest: what fairseq pickles when rank 0 broadcasts a loaded checkpoint to
# the other ranks (resuming with several processes): the omegaconf config and tensor placeholders.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
                              typing.Any, collections.defaultdict, dict, list, int, _TensorPlaceholder]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


# torch.save's legacy (pre-zip) format starts by pickling this magic number (protocol 2)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# the names fairseq-train gives its checkpoints (checkpoint_utils.save_checkpoint); nothing else is ever touched
FAIRSEQ_NAME = re.compile(r"checkpoint(?:_last|_best|\d+|_\d+_\d+)\.pt$")
COPIES = ("checkpoint_last.pt", "checkpoint_best.pt")


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


def _signature(path: str) -> Tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _corrupt_member(signature: Tuple[str, int, int]) -> Optional[str]:
    try:
        with zipfile.ZipFile(signature[0]) as z:
            return z.testzip()
    except zipfile.BadZipFile:
        return None  # not a zip: is_intact reports it
    except (OSError, EOFError, ValueError) as err:  # a member's bytes unreadable (e.g. its header damaged)
        return f"? ({err})"


def corrupt_member(path: str) -> Optional[str]:
    """The first member of a zip checkpoint whose CRC-32 does not match its bytes (torch's reader does not
    check them), or None."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    return _corrupt_member(_signature(path))


def unsafe_globals(path: str) -> List[str]:
    """Pickled classes/functions in `path` that neither torch nor our allow-list accepts."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return []  # torch < 2.5 has no weights-only default to satisfy
    if not zipfile.is_zipfile(path):
        return []  # the legacy format: torch's weights-only unpickler checks it as it loads (it cannot list it)
    return torch.serialization.get_unsafe_globals_in_checkpoint(path)


def _example(flag: str, path: str) -> str:
    """', e.g. FLAG <the sound checkpoint with most updates beside path>', or nothing when there is none."""
    beside = newest_intact(os.path.dirname(path) or ".", exclude=path)
    return f", e.g. {flag} {beside}" if beside else ""


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
            f"directory): resume from an intact checkpoint{_example(flag, path)}")
    member = corrupt_member(path)
    if member is not None:
        raise CheckpointError(
            f"{flag} {path} is corrupt: the stored checksum (CRC-32) of its part {member} does not match its bytes "
            f"(the file changed after it was written: a disk, copy or transfer error), so its numbers cannot be "
            f"trusted: refused; use another checkpoint{_example(flag, path)}")
    unsafe = unsafe_globals(path)
    if unsafe:
        raise CheckpointError(
            f"{flag} {path} holds pickled objects other than tensors and fairseq's settings ({', '.join(unsafe)}); "
            f"we refuse arbitrary pickles because loading them can run code: use a checkpoint written by "
            f"fairseq-train")


def refuse_non_finite(weights, path: str) -> None:
    """NaN or inf in a model weight gives plausible-looking but wrong numbers: refuse, naming the tensor."""
    for name, tensor in (weights or {}).items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel() \
                and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"checkpoint {path}: model weight {name} holds {bad} non-finite value(s) (NaN or inf) of "
                f"{tensor.numel()}: refused, since every number computed with it would be wrong; use an earlier "
                f"checkpoint (training diverged or the file was damaged)")


def refuse_bad_router_tables(state: dict, path: str) -> None:
    """A StableMoE checkpoint's token id -> expert tables (the frozen distilled router's, hash routing's) may only
    name experts the model has (-1: not built yet); anything else would end in an index error mid-evaluation."""
    stored = stored_config(state)
    cfg = stored.get("model") if hasattr(stored, "get") else None
    experts = option(cfg, "moe_experts")
    if not experts:
        return
    for name, table in (state.get("model") or {}).items():
        if not (name.endswith(".table") and torch.is_tensor(table)) or table.is_floating_point() or not table.numel():
            continue
        bad = (table < -1) | (table >= int(experts))
        if bad.any():
            token = int(bad.nonzero()[0, 0])
            raise CheckpointError(
                f"checkpoint {path}: {name} sends token id {token} to expert {int(table[token])}, but the model has "
                f"--moe-experts {experts} (experts 0..{int(experts) - 1}): refused; the file was changed or damaged "
                f"after training, use another checkpoint")


def read_state(path: str) -> dict:
    """The checkpoint's dict, memory-mapped when it can be (weights-only: our allow-list applies)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu")  # the legacy (pre-zip) format cannot be memory-mapped


def stored_config(state: dict):
    return state.get("cfg") or {"model": state.get("args")}


def checkpoint_files(save_dir: str) -> List[str]:
    """The checkpoints fairseq-train writes in `save_dir`, by its names (checkpoint_notes.pt is not one)."""
    return sorted(p for p in glob.glob(os.path.join(save_dir, "checkpoint*.pt"))
                  if os.path.isfile(p) and FAIRSEQ_NAME.match(os.path.basename(p)))


@functools.lru_cache(maxsize=256)
def _stored_update(signature: Tuple[str, int, int]) -> int:
    try:
        history = read_state(signature[0]).get("optimizer_history") or [{}]
        return int(history[-1].get("num_updates", 0))
    except Exception:  # unreadable: never chosen as a source
        return -1


def stored_update(path: str) -> int:
    """The update count fairseq stored in the checkpoint (-1 when it cannot be read)."""
    return _stored_update(_signature(path))


def sound(path: str) -> bool:
    return is_intact(path) and corrupt_member(path) is None


def newest_intact(save_dir: str, exclude: Optional[str] = None) -> Optional[str]:
    """The sound fairseq checkpoint in `save_dir` with the most updates stored inside (checkpoint_last.pt first
    among equals). Checksums are verified from the top down, so a save dir of many checkpoints is not read whole."""
    candidates = [p for p in checkpoint_files(save_dir) if p != exclude and is_intact(p) and stored_update(p) >= 0]
    candidates.sort(key=lambda p: (stored_update(p), os.path.basename(p) == "checkpoint_last.pt"), reverse=True)
    return next((p for p in candidates if corrupt_member(p) is None), None)


def _copy_atomically(source: str, path: str) -> None:
    tmp = f"{path}.recover-{os.getpid()}"
    shutil.copyfile(source, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recover_truncated(path: str) -> Optional[str]:
    """Repair a truncated checkpoint fairseq copied (checkpoint_last/best) from the sound checkpoint with the most
    updates beside it; move the damaged file aside (kept, never overwritten). Other fairseq names are only moved
    aside. Returns the source copied (None if none)."""
    save_dir, name = os.path.dirname(path) or ".", os.path.basename(path)
    if name not in COPIES:
        aside = move_aside(path, "damaged")
        logger.warning(f"{path} is truncated or damaged (the run was killed while fairseq copied a checkpoint to "
                       f"it): moved it to {aside}; fairseq does not resume from it")
        return None
    source = newest_intact(save_dir, exclude=path)
    if source is None:
        raise CheckpointError(f"{path} is truncated and no intact checkpoint is beside it: restart training "
                              f"without it (move it away) or pass --restore-file with an intact checkpoint")
    update = stored_update(source)
    aside = move_aside(path, "damaged")
    _copy_atomically(source, path)
    if name == "checkpoint_last.pt":
        logger.warning(f"{path} was truncated (the run was killed while fairseq copied a checkpoint); moved it to "
                       f"{aside} and replaced it with a copy of {source}, the intact checkpoint with the most "
                       f"updates ({update}): resuming from update {update}")
    else:
        logger.warning(f"{path} was truncated (the run was killed while fairseq copied a checkpoint); moved it to "
                       f"{aside} and replaced it with a copy of {source} (update {update}, the newest intact "
                       f"checkpoint): checkpoint_best.pt now holds the model of update {update}, which may not be "
                       f"the one with the best validation loss")
    return source


def refuse_stale_last(save_dir: str) -> None:
    """checkpoint_last.pt intact but older than another checkpoint of this run (killed after the save was written,
    before fairseq copied it to checkpoint_last.pt): fairseq would resume from the older one and overwrite the
    newer one. Resume from the newer one instead (the older last is kept aside)."""
    last = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.exists(last) or not sound(last):
        return
    newest = newest_intact(save_dir)
    if newest is None or newest == last or stored_update(newest) <= stored_update(last) \
            or os.path.getmtime(newest) <= os.path.getmtime(last):
        return
    aside = f"{last}.update{stored_update(last)}"
    os.replace(last, aside)
    _copy_atomically(newest, last)
    logger.warning(f"{last} held update {stored_update(aside)} but {newest} (written after it) holds update "
                   f"{stored_update(newest)}: the run was killed before fairseq copied its last save; resuming from "
                   f"update {stored_update(newest)} (the older checkpoint_last.pt is kept as {aside})")


def prepare_resume(save_dir: str, restore_file: str) -> Optional[str]:
    """Before fairseq-train loads its checkpoint: repair truncated copies (checkpoint_last.pt, checkpoint_best.pt),
    refuse a bad --restore-file or checkpoint_last.pt. Returns the path fairseq will load (None when it starts from scratch)."""
    if restore_file == "checkpoint_last.pt":
        # only copies can be truncated: the first file of a save is renamed into place
        names = checkpoint_files(save_dir)
        for path in sorted(names, key=lambda p: os.path.basename(p) in COPIES):  # the others first: not sources
            if not is_intact(path):
                recover_truncated(path)
        refuse_stale_last(save_dir)
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


# --- every load through fairseq's loader ---

_fairseq_load_checkpoint_to_cpu = None


def checked_load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    """fairseq's checkpoint_utils.load_checkpoint_to_cpu, with the checks above before and after (see the module's
    doc); installed by `install_checked_loader` at plugin import."""
    from fairseq.file_io import PathManager

    from .safe_config import refuse_evaluated_code

    local = not PathManager.path_requires_pathmanager(path)
    if local:
        check_checkpoint(path, flag="checkpoint")
        refuse_evaluated_code(stored_config(read_state(path)), "")
    state = _fairseq_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
    if not local:
        refuse_evaluated_code(stored_config(state), "")  # too late for fairseq's own upgrade, never for building
    refuse_non_finite(state.get("model"), path)
    refuse_bad_router_tables(state, path)
    return state


def install_checked_loader() -> None:
    global _fairseq_load_checkpoint_to_cpu
    from fairseq import checkpoint_utils

    from .safe_config import patch_fairseq_eval

    patch_fairseq_eval()
    if checkpoint_utils.load_checkpoint_to_cpu is not checked_load_checkpoint_to_cpu:
        _fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
        checkpoint_utils.load_checkpoint_to_cpu = checked_load_checkpoint_to_cpu


def load_checked(path: str, arg_overrides=None, flag: str = "--path") -> dict:
    """A checkpoint for our tools: refused if unsafe (pickles, code in its config, damaged, non-finite weights)."""
    from fairseq import checkpoint_utils

    check_checkpoint(path, flag)
    install_checked_loader()
    return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)


install_checked_loader()
