"""Expert parallelism: which rank owns which experts, and what fairseq's trainer needs to know about them.

Under expert parallelism each of W ranks owns N/W experts (global ids r·N/W ... (r+1)·N/W - 1 on rank r).
Their parameters carry `expert = True`, fairseq's own convention: legacy_ddp leaves their gradients out of
the data-parallel all-reduce and `clip_grad_norm_` leaves them out of the norm (it still scales them), so
the norm fairseq logs, clips by and checks across ranks is the shared parameters' one.
Checkpoints hold every expert under its global id: rank 0 gathers the other ranks' experts when all ranks
validate, which fairseq does before each save.
"""
from typing import Iterator

import torch
import torch.distributed as dist

from . import comm

def expert_shard(num_experts: int, world: int, rank: int) -> range:
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def sharded_layers(model) -> Iterator:
    from .dispatch import ExpertParallelDispatcher
    from .layer import moe_layers

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
        local = list(experts.expert_state().values())  # this rank's experts, in id order
        flat = torch.cat([v.reshape(-1) for v in local])
        received = [torch.empty_like(flat) for _ in range(world)] if comm.rank() == 0 else None
        dist.gather(flat, received, dst=0, group=group)
        if received is None:
            continue
        gathered = {}
        for source in range(1, world):  # every rank holds as many experts of the same shapes, in the same order
            keys = experts.expert_keys(expert_shard(layer.num_experts, world, source))
            chunks = received[source].cpu().split([t.numel() for t in local])
            for key, template, chunk in zip(keys, local, chunks):
                gathered[key] = chunk.view_as(template.cpu()).to(template.dtype).clone()
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
