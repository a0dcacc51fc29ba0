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
from typing import Dict, List

import torch
from fairseq import tasks
from omegaconf import OmegaConf

from .checkpoints import load_checked
from .moe import MoELayer
from .moe.expert_parallel import expert_parallel_world, expert_shard

logger = logging.getLogger("fairseq_stablemoe.reshard_checkpoint")


def rank0_parameter_names(model, cfg, world_size: int) -> List[str]:
    """The trainable parameters rank 0 of `world_size` processes hands to its optimizer, in order."""
    foreign = set()
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        ep_world = expert_parallel_world(cfg, world_size, layer.num_experts)
        mine = set(expert_shard(layer.num_experts, ep_world, 0))
        for expert_id, expert in layer.experts.experts.items():
            if int(expert_id) not in mine:
                foreign.update(id(p) for p in expert.parameters())
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in foreign]


def is_expert_parameter(name: str) -> bool:
    return ".experts.experts." in name or name.startswith("experts.experts.")


def reshard_optimizer_state(optim_state: Dict, saved_names: List[str], new_names: List[str]) -> Dict:
    groups = optim_state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"only single-group optimizer states can be resharded (this one has {len(groups)}); "
                         f"resume with --reset-optimizer instead")
    if len(groups[0]["params"]) != len(saved_names):
        raise ValueError(f"the checkpoint's optimizer holds {len(groups[0]['params'])} parameters but the model "
                         f"it was saved with has {len(saved_names)}: was it written by this plugin?")
    position = {name: index for name, index in zip(saved_names, groups[0]["params"])}
    state, dropped = {}, 0
    for new_index, name in enumerate(new_names):
        old = position.get(name)
        if old is None or old not in optim_state["state"]:
            continue
        if is_expert_parameter(name):
            dropped += 1
            continue
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
    saved = rank0_parameter_names(model, cfg.model, saved_world)
    new = rank0_parameter_names(model, cfg.model, world_size)
    if state.get("last_optimizer_state") is not None:
        state["last_optimizer_state"] = reshard_optimizer_state(state["last_optimizer_state"], saved, new)
    cfg.distributed_training.distributed_world_size = world_size
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.save(state, out)
    logger.info(f"{path} (saved by {saved_world} processes) -> {out} (for {world_size})")


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
    reshard(args.checkpoint, args.output, args.world_size, args.data)


if __name__ == "__main__":
    main()
