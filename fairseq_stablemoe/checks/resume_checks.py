"""Checks before fairseq-train loads the checkpoint it resumes (or fine-tunes from): which checkpoint that is (after
repairing truncated copies), whether the run is already finished, and whether the checkpoint's MoE settings and
number of processes match this command line."""
import logging
import os
import sys
from typing import Optional, Tuple

import torch

from ..checkpoints import check_checkpoint, prepare_resume
from ..moe import comm
from ..moe.config import flag
from ..options import option, task_option
from .preflight import moe_settings

logger = logging.getLogger(__name__)


def resume_path(task) -> Optional[str]:
    """The checkpoint fairseq-train resumes from (--restore-file, or SAVE_DIR/checkpoint_last.pt), if it exists."""
    save_dir, restore = task_option(task, "save_dir"), task_option(task, "restore_file", "checkpoint_last.pt")
    if save_dir is None:
        return None
    path = restore if restore != "checkpoint_last.pt" else os.path.join(save_dir, restore)
    return path if os.path.isfile(path) else None


def checkpoint_to_load(task) -> Tuple[Optional[str], str]:
    """The checkpoint fairseq-train will load (after repairing truncated copies), and 'resume' or 'finetune'."""
    save_dir = task_option(task, "save_dir")
    if save_dir is None:
        return None, ""
    if comm.rank() == 0:
        prepare_resume(save_dir, task_option(task, "restore_file", "checkpoint_last.pt"))
    path = resume_path(task)
    if path is not None:
        return path, "resume"
    finetune = task_option(task, "finetune_from_model")
    if finetune:
        if os.path.exists(finetune):
            check_checkpoint(finetune, "--finetune-from-model")
        return finetune, "finetune"
    return None, ""


def read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True)  # weights_only: our allow-list applies
    except RuntimeError:
        return torch.load(path, map_location="cpu")  # the legacy (pre-zip) format cannot be memory-mapped


def refuse_finished_run(task, state: dict, path: str) -> None:
    """fairseq trains one more update on a finished run (and rewrites checkpoint_last.pt): change nothing."""
    history = state.get("optimizer_history") or [{}]
    done, max_update = int(history[-1].get("num_updates", 0)), int(task_option(task, "max_update", 0))
    if max_update > 0 and done >= max_update:
        logger.info(f"{path} holds update {done} and --max-update is {max_update}: this run is finished, nothing "
                    f"to train; raise --max-update to continue it, or give a new run another --save-dir")
        sys.exit(0)


MOE_SETTINGS = ["moe_experts", "moe_sublayers", "moe_layers", "moe_position", "moe_ffn_embed_dim", "moe_routing",
                "hash_type", "hash_table", "hash_gate", "stage2_gate", "stage1_assignment", "distilled_router",
                "distilled_dim", "distilled_router_layers", "encoder_moe_layers",
                "encoder_moe_position", "decoder_moe_layers", "decoder_moe_position"]


def _setting(cfg, name):
    """A MoE flag's value as the model uses it: --moe-ffn-embed-dim 0 stands for the model's FFN size."""
    value = option(cfg, name)
    if name == "moe_ffn_embed_dim" and value is not None and int(value) == 0:
        sizes = {int(option(cfg, f"{side}_ffn_embed_dim")) for side in ("encoder", "decoder")
                 if option(cfg, f"{side}_ffn_embed_dim") is not None}
        if len(sizes) == 1:
            return sizes.pop()
    return value


def compare_moe_settings(saved, cfg, path: str) -> None:
    differ = [f"{flag(name)} {option(saved, name)} (checkpoint) / {option(cfg, name)} (command line)"
              for name in MOE_SETTINGS
              if option(saved, name) is not None and option(cfg, name) is not None
              and str(_setting(saved, name)) != str(_setting(cfg, name))]
    if differ:
        raise ValueError(f"{path} was trained with other MoE settings than this command line: {', '.join(differ)}; "
                         f"resume with the checkpoint's values, or start a new run in another --save-dir")


def _sharded(model_cfg, world: int) -> bool:
    settings = moe_settings(model_cfg)
    return settings is not None and settings.expert_parallel_world(world) > 1


def check_world_size(task, saved, path: str) -> None:
    """A checkpoint of W expert-sharded processes holds rank 0's optimizer state: N/W experts' worth."""
    saved_world = int(option(option(saved, "distributed_training"), "distributed_world_size", 1))
    world = comm.world_size()
    if saved_world == world or task_option(task, "reset_optimizer", False):
        return
    if _sharded(option(saved, "model"), saved_world) or _sharded(option(saved, "model"), world):
        raise ValueError(
            f"{path} was saved by {saved_world} processes and this run has {world}, with the experts sharded: "
            f"its optimizer state does not fit; run python -m fairseq_stablemoe.reshard_checkpoint {path} "
            f"NEW_DIR/checkpoint_last.pt --world-size {world} and resume with --restore-file "
            f"NEW_DIR/checkpoint_last.pt (or add --reset-optimizer)")
