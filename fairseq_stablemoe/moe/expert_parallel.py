"""Expert parallelism: which rank owns which experts, and what fairseq's trainer needs to know about them.

Under expert parallelism each of W ranks owns N/W experts (global ids r·N/W ... (r+1)·N/W - 1 on rank r).
Their parameters carry `expert = True`, fairseq's own convention: legacy_ddp leaves their gradients out of
the data-parallel all-reduce and `clip_grad_norm_` leaves them out of the norm (it still scales them), so
the norm fairseq logs, clips by and checks across ranks is the shared parameters' one.
Checkpoints hold every expert under its global id: rank 0 gathers the other ranks' experts when all ranks
validate, which fairseq does before each save.
"""
import logging
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import comm

logger = logging.getLogger(__name__)


def expert_parallel_world(cfg, world: Optional[int] = None, num_experts: Optional[int] = None) -> int:
    """How many of `world` ranks (default: this job's) a layer's `num_experts` (default --moe-experts) experts
    are sharded over; 1 = all on every rank (a dense control's single FFN stack is shared like any parameter)."""
    world, num_experts = world or comm.world_size(), num_experts or cfg.moe_experts
    mode = str(getattr(cfg, "moe_expert_parallel", "auto"))
    if world == 1 or mode == "off" or num_experts == 1:
        return 1
    if num_experts % world == 0:
        return world
    if mode == "on":
        raise ValueError(
            f"--moe-expert-parallel on needs the number of processes ({world}) to divide --moe-experts "
            f"({num_experts}); use a multiple of {world} experts, or --moe-expert-parallel off to replicate "
            f"the experts on every rank")
    logger.warning(f"{world} processes do not divide --moe-experts {num_experts}: every rank holds all experts "
                   f"(no expert parallelism); use a multiple of {world} experts to shard them")
    return 1


def expert_shard(num_experts: int, world: int, rank: int) -> range:
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def sharded_layers(model) -> Iterator:
    from .dispatch import ExpertParallelDispatcher
    from . import moe_layers

    return (m for m in moe_layers(model) if isinstance(m.dispatcher, ExpertParallelDispatcher))


def tag_expert_parameters(experts):
    for p in experts.parameters():
        p.expert = True


def scale_expert_gradients(model):
    """Make fairseq's gradient normalisation right for experts.

    fairseq averages shared gradients over the W ranks, then multiplies every gradient by
    W / (sample size of all ranks). An expert's gradient already sums the contributions of every rank's
    tokens and is not averaged, so it is divided by W as it accumulates.
    """
    for layer in sharded_layers(model):
        world = layer.dispatcher.world
        for p in layer.experts.parameters():
            p.register_hook(lambda grad, world=world: grad / world)


@torch.no_grad()
def gather_experts(model):
    """Collective: rank 0 receives a copy of every other rank's experts (for the next checkpoint)."""
    for layer in sharded_layers(model):
        experts, group, world = layer.experts, layer.dispatcher.group, layer.dispatcher.world
        local = experts.expert_state()  # "<global id>.<name>", this rank's experts in id order
        names = [k.split(".", 1)[1] for k in local if k.split(".", 1)[0] == str(experts.global_ids[0])]
        flat = torch.cat([v.reshape(-1) for v in local.values()])
        received = [torch.empty_like(flat) for _ in range(world)] if comm.rank() == 0 else None
        dist.gather(flat, received, dst=0, group=group)
        if received is None:
            continue
        templates = list(local.values())[: len(names)]
        gathered = {}
        for source in range(1, world):
            chunks = received[source].cpu().split([t.numel() for t in templates] * len(experts))
            ids = expert_shard(layer.num_experts, world, source)
            for j, expert_id in enumerate(ids):
                for name, template, chunk in zip(names, templates, chunks[j * len(names):(j + 1) * len(names)]):
                    gathered[f"{expert_id}.{name}"] = chunk.view_as(template.cpu()).to(template.dtype).clone()
        experts.gathered = gathered


def drop_gathered_experts(model):
    """The experts are about to change: a gathered copy would be stale."""
    for layer in sharded_layers(model):
        layer.experts.gathered = None


def reset_expert_optimizer_state(optimizer, model) -> int:
    """Forget the optimizer state of this rank's experts (see the README: it does not survive a resume)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    dropped = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if hasattr(p, "expert") and inner.state.pop(p, None) is not None:
                dropped += 1
    return dropped


def check_trainer_setup(model, optimizer):
    """What fairseq must do for expert-parallel training; `model` is the trainer's (wrapped) model."""
    from fairseq.distributed import LegacyDistributedDataParallel

    if not any(True for _ in sharded_layers(model)):
        return
    if not any(isinstance(m, LegacyDistributedDataParallel) for m in model.modules()):
        raise ValueError("expert parallelism needs --ddp-backend legacy_ddp (the other backends would average "
                         "each rank's different experts); or replicate the experts: --moe-expert-parallel off")
    if getattr(optimizer, "has_flat_params", False):
        raise ValueError("expert parallelism with --fp16 needs --fp16-no-flatten-grads (a flat fp32 copy loses "
                         "the expert tag of the parameters)")
