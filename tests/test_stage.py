"""The stage is the routing's own: decided from fairseq's update count (set_num_updates), saved with the model,
and safe in the order fairseq builds the optimizer, loads a checkpoint and passes the update count."""
import pytest
import torch
from fairseq import optim

import helpers
from fairseq_stablemoe.moe.routing.stablemoe import Stage1Schedule, stage1_schedule


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.tiny_lm_data(tmp_path_factory.mktemp("stage"))


def routing_of(model):
    return model.moe_layers()[0].routing


def test_the_update_count_decides_the_stage(data):
    model = helpers.build_for_training(data, "--stage1-updates", "5")[2]
    routing = routing_of(model)
    model.set_num_updates(4)
    assert not routing.in_stage2 and routing.stage2_began is None
    model.set_num_updates(5)
    assert routing.in_stage2 and routing.stage2_began == 5
    model.set_num_updates(9)
    assert routing.stage2_began == 5  # entered once
    saved = {k: v for k, v in model.state_dict().items() if not torch.is_tensor(v)}
    assert saved == {"decoder.layers.1.routing._extra_state": {"stage2_began": 5}}  # the stage: one saved number
    table = routing.distilled_router.table.clone()
    assert table.min() >= 0, "stage 2 routes by the token -> expert table"


def test_stage1_can_end_at_an_update_decided_at_run_time(data):
    routing = routing_of(helpers.build_for_training(data)[2])
    routing.stage1_schedule = stage1_schedule("auto")  # no fixed schedule: only end_stage1 ends stage 1
    routing.set_num_updates(10 ** 6)
    assert not routing.in_stage2
    routing.end_stage1(7)
    assert routing.in_stage2 and routing.stage2_began == 7


def test_stage1_schedule_is_a_number_or_auto():
    assert stage1_schedule("auto").auto and stage1_schedule(" auto ") == stage1_schedule("auto")
    fixed = stage1_schedule("6000")
    assert fixed == Stage1Schedule(6000) and not fixed.auto and str(fixed) == "6000"
    assert stage1_schedule(fixed) is fixed and stage1_schedule(0) == Stage1Schedule(0)
    assert not fixed.ends_by(5999) and fixed.ends_by(6000) and stage1_schedule(0).ends_by(0)
    assert not any(stage1_schedule("auto").ends_by(n) for n in (0, 10 ** 9))
    for bad in ("-1", "1.5", "", "None", None):
        with pytest.raises(ValueError, match="--stage1-updates must be"):
            stage1_schedule(bad)


def test_loading_restores_the_saved_stage_whatever_the_update_count_said_before(data):
    """fairseq calls set_num_updates(N) *before* load_state_dict: the checkpoint's stage wins, and loading never
    changes which parameters require a gradient (the optimizer rebuilt after loading must match its saved state)."""
    saved = helpers.build_for_training(data, "--stage1-updates", "3")[2]
    saved.set_num_updates(3)
    stage2_state = saved.state_dict()
    stage1_state = helpers.build_for_training(data, "--stage1-updates", "3")[2].state_dict()

    model = helpers.build_for_training(data, "--stage1-updates", "3")[2]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model.set_num_updates(10)
    model.load_state_dict(stage1_state)
    assert not routing_of(model).in_stage2  # a stage-1 checkpoint saved at an update >= --stage1-updates
    assert bool((routing_of(model).distilled_router.table == -1).all())  # the table end_stage1 built is gone
    model.set_num_updates(0)
    model.load_state_dict(stage2_state)
    routing = routing_of(model)
    assert routing.in_stage2 and routing.stage2_began == 3
    assert torch.equal(routing.distilled_router.table, routing_of(saved).distilled_router.table)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_router_frozen_after_the_optimizer_exists_never_moves(data):
    """The optimizer holds the router from stage 1 (Adam moments included); from stage 2 on it gets no gradient,
    even where fairseq's fp16 optimizer would hand every parameter that requires one a zero gradient."""
    torch.manual_seed(0)
    cfg, task, model, criterion = helpers.build_for_training(data, "--stage1-updates", "2", "--weight-decay", "0.1")
    task.load_dataset("train")
    dataset = task.dataset("train")
    optimizer = optim.build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    router = routing_of(model).distilled_router
    model.train()
    frozen = None
    for step in range(5):
        sample = dataset.collater([dataset[i] for i in range(4 * step, 4 * step + 4)])
        task.train_step(sample, model, criterion, optimizer, update_num=step)
        for p in optimizer.params:  # what FP16Optimizer does for a parameter that requires a gradient
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:  # the last stage-1 update
            frozen = {k: v.clone() for k, v in router.named_parameters()}
        if step < 2:
            assert router.embed.weight.requires_grad
    assert not any(p.requires_grad for p in router.parameters())
    for name, value in router.named_parameters():
        assert torch.equal(value, frozen[name]), name


def test_layerdrop_that_skips_the_moe_layer_trains(data):
    """--decoder-layerdrop 0.5: a batch whose forward skips the MoE layer reports no MoE aux (none of an earlier
    batch's graph comes back), and its update goes through."""
    torch.manual_seed(0)
    cfg, task, model, criterion = helpers.build_for_training(data, "--decoder-layerdrop", "0.5")
    task.load_dataset("train")
    dataset = task.dataset("train")
    optimizer = optim.build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    model.train()
    routed = []
    for step in range(8):
        sample = dataset.collater([dataset[i] for i in range(4 * step, 4 * step + 4)])
        loss, _, log = task.train_step(sample, model, criterion, optimizer, update_num=step)
        optimizer.step()
        optimizer.zero_grad()
        routed.append(int(log["moe_tokens"]))
        assert (log["moe_distill_loss"] != 0) == (routed[-1] > 0)
    assert 0 in routed and any(routed), f"the seed must skip the MoE layer in some batches only: {routed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_copy_of_a_stage2_model_routes_by_the_saved_table(data, dtype):
    """Inference after stage 2 routes by the integer token -> expert table saved with the model, not by the
    router's weights: in fp16/bf16 two nearly equal scores would tie and send the token elsewhere."""
    trained = helpers.build_for_training(data, "--stage1-updates", "3")[2]
    router = routing_of(trained).distilled_router
    token, one = 5, torch.zeros(router.centroids.size(1))
    one[0] = 1.0
    with torch.no_grad():
        router.embed.weight[token] = one
        router.centroids.zero_()
        router.centroids[0] = one
        router.centroids[1] = one * (1 + 2 ** -12)  # float32 tells them apart; fp16 and bf16 round both to 1
    trained.set_num_updates(3)
    assert int(router.table[token]) == 1

    model = helpers.build_for_training(data, "--stage1-updates", "3")[2]  # as fairseq loads it for evaluation
    model.load_state_dict(trained.state_dict())
    model.to(dtype).eval()
    chosen = []
    routing_of(model).register_forward_hook(lambda m, i, out: chosen.append(out.expert))
    tokens = torch.tensor([[token, 6, token, 7]])
    with torch.no_grad():
        model(tokens)
    assert torch.equal(chosen[0], router.table[tokens[0]])
