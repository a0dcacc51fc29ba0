"""Expert parallelism over 2 gloo processes against one process holding every expert."""
import argparse
import copy
import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fairseq import utils
from fairseq.distributed import LegacyDistributedDataParallel

from helpers import free_port, make_dictionary
from fairseq_stablemoe.moe import ExpertParallelDispatcher, MoEConfig, Vocabulary, build_moe_layer
from fairseq_stablemoe.moe import MoESettings
from fairseq_stablemoe.moe.expert_parallel import check_trainer_setup, gather_experts

WORLD, EXPERTS, DIM, SEQ, BSZ = 2, 4, 8, 5, 3
TOLERANCE = 1e-6


def moe_cfg(**overrides):
    cfg = argparse.Namespace(**{k: v for k, v in vars(MoEConfig()).items() if not k.startswith("_")})
    cfg.moe_experts, cfg.moe_sublayers, cfg.moe_ffn_embed_dim, cfg.distilled_dim = EXPERTS, 2, 16, 4
    cfg.stage1_updates = 10
    vars(cfg).update(overrides)
    return cfg


def vocabulary():
    return Vocabulary.of(make_dictionary(12))


def build_layer(table=None):
    """Same seed => same weights; `table` (token id -> expert) puts the layer in stage 2 with fixed routing."""
    torch.manual_seed(0)
    layer = build_moe_layer(moe_cfg(), DIM, 16, vocabulary())
    if table is not None:
        layer.routing.end_stage1(0)
        layer.routing.distilled_router.table.copy_(table)
    return layer.train()


def named(layer, of=lambda p: p):
    """Each parameter (or what `of` gives for it, e.g. its gradient) by name; each expert's by its global id,
    as in a checkpoint: a rank's stacked experts hold another slice of them than the single process's."""
    out = {n: of(p) for n, p in layer.named_parameters() if not n.startswith("experts.")}
    stacked = {n: of(p) for n, p in layer.experts.named_parameters()}
    out.update({"experts.experts." + k: v for k, v in layer.experts.per_expert(stacked).items()})
    return {k: v for k, v in out.items() if v is not None}


def perturb_experts(layer):
    """Experts start as the identity (zero output projection): give them weights that pass gradients on,
    the same for a given expert wherever it lives."""
    with torch.no_grad():
        for name, p in named(layer).items():
            if name.startswith("experts."):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.3)


def run(layer, x, tokens):
    """Forward, a loss using the output and every routing loss, backward; returns output and loss."""
    x = x.clone().requires_grad_(True)
    out, aux = layer(x, tokens)
    loss = (out * torch.linspace(-1, 1, DIM)).sum() + sum(v for k, v in aux.items() if k.endswith("_loss"))
    loss.backward()
    return out.detach(), loss.detach(), x.grad


def batches(case):
    """Per-rank token batches (B x T) and hidden states (T x B x C); and the routing table if fixed."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(SEQ, BSZ, DIM, generator=g) for _ in range(WORLD)]
    pad = vocabulary().padding_idx
    if case == "learned":  # stage 1, routed by the centroids, balance and distillation losses
        return [torch.randint(4, 16, (BSZ, SEQ), generator=g) for _ in range(WORLD)], x, None
    table = torch.tensor([0] * 4 + [0, 1, 3, 0, 1, 3, 0, 0, 0, 0, 0, 0])  # nothing ever goes to expert 2
    rank0 = torch.randint(4, 10, (BSZ, SEQ), generator=g)  # experts 0, 1 and 3
    if case == "sparse":  # rank 1: half padding, the rest only for expert 0
        rank1 = torch.full((BSZ, SEQ), 4)
        rank1[:, SEQ // 2:] = pad
    else:  # "empty": rank 1 has no token at all
        rank1 = torch.full((BSZ, SEQ), pad)
    return [rank0, rank1], x, table


def reference(case):
    tokens, x, table = batches(case)
    layer = build_layer(table)
    built = copy.deepcopy(layer.state_dict())
    perturb_experts(layer)
    out, loss, x_grad = run(layer, torch.cat(x, 1), torch.cat(tokens, 0))
    grads = {n: g.clone() for n, g in named(layer, lambda p: p.grad).items()}
    return {"out": out, "loss": loss, "x_grad": x_grad, "grads": grads, "built": built, "state": layer.state_dict()}


def init(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def check_equivalence(rank, case, ref):
    tokens, x, table = batches(case)
    layer = build_layer(table)
    assert isinstance(layer.dispatcher, ExpertParallelDispatcher)
    assert layer.experts.global_ids == [2 * rank, 2 * rank + 1]
    for name, p in named(layer).items():  # same seed: same weights as the single-process layer
        torch.testing.assert_close(p, ref["built"][name], rtol=0, atol=0)
    perturb_experts(layer)
    assert all(getattr(p, "expert", False) for p in layer.experts.parameters())

    out, loss, x_grad = run(layer, x[rank], tokens[rank])
    cols = slice(rank * BSZ, (rank + 1) * BSZ)
    torch.testing.assert_close(out, ref["out"][:, cols], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(x_grad, ref["x_grad"][:, cols], rtol=0, atol=TOLERANCE)
    dist.all_reduce(loss)
    torch.testing.assert_close(loss, ref["loss"], rtol=0, atol=TOLERANCE * 10)
    params = named(layer)
    for name, p in params.items():
        grad = named(layer, lambda p: p.grad).get(name, torch.zeros_like(p))
        if not hasattr(params[name], "expert") and not name.startswith("experts."):  # shared: summed over ranks
            dist.all_reduce(grad)
        expected = ref["grads"].get(name, torch.zeros_like(p))
        torch.testing.assert_close(grad, expected, rtol=0, atol=TOLERANCE, msg=f"{case}: {name}")
    if case != "learned":
        assert not ref["grads"]["experts.experts.2.0.ff1.weight"].any()  # expert 2 really got no token
        assert ref["grads"]["experts.experts.3.0.ff1.weight"].any()
    return layer


def check_checkpoint_gather(rank, layer, ref):
    """Rank 0's state dict holds every expert by global id; every rank loads its own from a full one."""
    if rank == 0:
        assert {k for k in layer.state_dict() if ".experts." in k} < {k for k in ref["state"] if ".experts." in k}
    gather_experts(layer)
    if rank == 0:
        state = layer.state_dict()
        assert set(state) == set(ref["state"])
        for name, value in ref["state"].items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    fresh = build_moe_layer(moe_cfg(), DIM, 16, vocabulary())  # other weights
    fresh.load_state_dict(ref["state"])  # all four experts in the file; it keeps its two
    for name, p in named(fresh).items():
        torch.testing.assert_close(p.detach(), ref["state"][name], rtol=0, atol=0)


def check_expert_gradients_not_averaged(rank):
    """legacy_ddp averages shared gradients and leaves expert ones alone; the clip norm agrees on all ranks."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"shared": torch.nn.Linear(DIM, DIM),
                                 "moe": build_moe_layer(moe_cfg(), DIM, 16, vocabulary())})
    with pytest.raises(ValueError, match="--ddp-backend legacy_ddp"):
        check_trainer_setup(model, optimizer=None)  # e.g. c10d would average the different experts
    ddp = LegacyDistributedDataParallel(model, process_group=dist.group.WORLD)
    check_trainer_setup(ddp, optimizer=None)
    planted = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, float(rank + 1) * (10 if hasattr(p, "expert") else 1))
        planted[name] = p.grad.clone()
    ddp.all_reduce_grads()
    for name, p in model.named_parameters():
        if hasattr(p, "expert"):
            torch.testing.assert_close(p.grad, planted[name], rtol=0, atol=0)  # not averaged
        else:
            torch.testing.assert_close(p.grad, torch.full_like(p, 1.5))  # mean of 1 and 2
    norm = utils.clip_grad_norm_(list(model.parameters()), max_norm=1.0)
    norms = [torch.zeros(()) for _ in range(WORLD)]
    dist.all_gather(norms, norm.reshape(()))
    assert norms[0] == norms[1]  # fairseq's _check_grad_norms would abort otherwise
    expert = next(p for p in model.parameters() if hasattr(p, "expert"))
    assert expert.grad.abs().max() < 10 * (rank + 1)  # expert grads still get the clip coefficient


def check_placement_choices(rank):
    world = lambda **cfg: MoESettings.of(moe_cfg(**cfg)).expert_parallel_world(WORLD)  # noqa: E731
    assert world() == WORLD
    assert world(moe_expert_parallel="off") == 1
    assert world(moe_experts=3) == 1  # auto: replicated, with a warning
    assert world(moe_routing="dense") == 1  # a dense control's one FFN stack is shared
    with pytest.raises(ValueError, match="--moe-expert-parallel"):
        world(moe_experts=3, moe_expert_parallel="on")
    replicated = build_moe_layer(moe_cfg(moe_expert_parallel="off"), DIM, 16, vocabulary())
    assert len(replicated.experts) == EXPERTS
    assert not any(hasattr(p, "expert") for p in replicated.parameters())


def worker(rank, port, refs):
    init(rank, port)
    try:
        for case, ref in refs.items():
            layer = check_equivalence(rank, case, ref)
            if case == "learned":
                check_checkpoint_gather(rank, layer, ref)
        check_expert_gradients_not_averaged(rank)
        check_placement_choices(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_expert_parallel_layer_matches_one_process():
    refs = {case: reference(case) for case in ("learned", "sparse", "empty")}
    assert refs["learned"]["grads"]["routing.distilled_router.centroids"].abs().sum() > 0
    mp.start_processes(worker, args=(free_port(), refs), nprocs=WORLD, start_method="fork")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    test_two_rank_expert_parallel_layer_matches_one_process()
