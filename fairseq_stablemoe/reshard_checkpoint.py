"""Make a checkpoint resumable with another number of processes.

    stablemoe-reshard-checkpoint ckpt/checkpoint_last.pt ckpt1/checkpoint_last.pt --world-size 1 [--data DATA_DIR]
    (the same: python -m fairseq_stablemoe.reshard_checkpoint ...)

The model weights in a checkpoint never depend on the world size (every expert is stored under its
global id), so fairseq-eval-lm / fairseq-generate and fine-tuning with --reset-optimizer need nothing.
The optimizer state does: fairseq stores one rank's optimizer state by parameter position, and with
expert parallelism a rank holds N/W experts. This rewrites it for rank 0 of the new world size: shared
parameters keep their state; the experts' state is dropped (resuming with expert parallelism drops it
anyway), and a warning says so.
"""
import argparse
import logging
import os
from typing import Dict, List

import torch
from fairseq import tasks
from omegaconf import OmegaConf

from .atomic import atomic_open
from .checkpoints import load_checked
from .legacy_optimizer_state import legacy_parameter_names
from .moe.expert_keys import is_expert_parameter, trainable_names

logger = logging.getLogger("fairseq_stablemoe.reshard_checkpoint")


def reshard_optimizer_state(optim_state: Dict, saved_names: List[str], new_names: List[str]) -> Dict:
    groups = optim_state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"only single-group optimizer states can be resharded (this one has {len(groups)}); "
                         f"resume with --reset-optimizer instead")
    if len(groups[0]["params"]) != len(saved_names):
        raise ValueError(f"the checkpoint's optimizer holds {len(groups[0]['params'])} parameters but the model "
                         f"it was saved with has {len(saved_names)}: was it written by this plugin?")
    position = {name: index for name, index in zip(saved_names, groups[0]["params"])}
    dropped = sum(1 for name, index in position.items() if is_expert_parameter(name) and index in optim_state["state"])
    state = {}
    for new_index, name in enumerate(new_names):
        old = position.get(name)
        if old is not None and old in optim_state["state"] and not is_expert_parameter(name):
            state[new_index] = optim_state["state"][old]
    if dropped:
        logger.warning(f"dropped the optimizer state of {dropped} expert parameters: they start afresh on resume")
    return {**optim_state, "state": state, "param_groups": [{**groups[0], "params": list(range(len(new_names)))}]}


def reshard(path: str, out: str, world_size: int, data: str = None):
    state = load_checked(path, flag="checkpoint")
    cfg = state["cfg"] if OmegaConf.is_config(state["cfg"]) else OmegaConf.create(state["cfg"])
    if data:
        cfg.task.data = data
    task = tasks.setup_task(cfg.task)
    # this process alone: every expert, every parameter, model order (no training: no save-dir lock, no resume)
    model = task.build_model(cfg.model, from_checkpoint=True)
    saved_world = cfg.distributed_training.distributed_world_size
    saved = new = trainable_names(model)  # the experts' stacked weights: the same names at any world size
    optim = state.get("last_optimizer_state")
    legacy = legacy_parameter_names(model, cfg.model, saved_world)
    if optim is not None and len(optim["param_groups"]) == 1 and len(optim["param_groups"][0]["params"]) == len(
            legacy) != len(saved):
        saved = legacy  # written before the experts' weights were stacked: one parameter per expert
    if optim is not None:
        state["last_optimizer_state"] = reshard_optimizer_state(state["last_optimizer_state"], saved, new)
    reshard_iterator_position(state, saved_world, world_size)
    cfg.distributed_training.distributed_world_size = world_size
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    with atomic_open(out) as f:  # a kill during the write leaves no cut file behind
        torch.save(state, f)
    logger.info(f"{path} (saved by {saved_world} processes) -> {out} (for {world_size})")


def reshard_iterator_position(state: dict, saved_world: int, world_size: int) -> None:
    """fairseq stores how many batches each of the W ranks has taken in this epoch (they take every W-th batch of
    one list, which does not depend on W); W' ranks continue from the same place in that list: k * W / W'
    (fairseq alone, with the old count: "Cannot resume training due to dataloader mismatch")."""
    itr = (state.get("extra_state") or {}).get("train_iterator")
    if not isinstance(itr, dict) or not itr.get("iterations_in_epoch") or saved_world == world_size:
        return
    taken = int(itr["iterations_in_epoch"]) * saved_world
    itr["iterations_in_epoch"] = taken // world_size
    logger.info(f"epoch {itr.get('epoch')}: {taken} batches were taken by {saved_world} processes; each of "
                f"{world_size} resumes after batch {itr['iterations_in_epoch']} of its shard")


def check_paths(parser, checkpoint: str, output: str) -> None:
    """Before anything is read or written: the output must be a new file; its folder is created."""
    if os.path.isdir(output):
        parser.error(f"the output {output} is a directory: name the file to write, e.g. "
                     f"{os.path.join(output, 'checkpoint_last.pt')}")
    if os.path.exists(output) and os.path.exists(checkpoint) and os.path.samefile(output, checkpoint):
        parser.error(f"the output {output} is the input checkpoint: resharding drops the experts' optimizer state, "
                     f"so keep the original and write to another file, e.g. NEW_DIR/checkpoint_last.pt")
    if os.path.exists(output):
        parser.error(f"the output {output} exists: a checkpoint is never overwritten; name a new file (e.g. in a "
                     f"new folder) or move that one away first")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        os.makedirs(folder)
        logger.info(f"created {folder} for the output")


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(prog="stablemoe-reshard-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--world-size", type=int, required=True, help="processes that will resume from it")
    parser.add_argument("--data", help="data directory, if it moved since training (for the dictionary)")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size must be at least 1 (got {args.world_size}): the number of processes that "
                     f"will resume from the output")
    check_paths(parser, args.checkpoint, args.output)
    reshard(args.checkpoint, args.output, args.world_size, args.data)


if __name__ == "__main__":
    main()
