"""Numerics: empty batches, collapsed routing, non-finite affinities and mixed precision never break routing."""
import pytest
import torch

import helpers
from fairseq_stablemoe.moe.routing import TokenView
from fairseq_stablemoe.moe import MoELayer

DIM = 32  # --decoder-embed-dim of helpers.train_lm_args


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    model = helpers.build_for_training(helpers.tiny_lm_data(tmp_path_factory.mktemp("numerics")))[2]
    with torch.no_grad():  # trained-looking experts: an untrained one is the identity (zero-init ff2)
        for layer in model.moe_layers():
            for p in layer.experts.parameters():
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def layer(model):
    """A fresh copy of the model's MoE layer (stage 1, training mode)."""
    import copy

    layer = copy.deepcopy(model.moe_layers()[0]).train()
    return layer


def run(layer, x, tokens):
    """(output, aux) of the model's MoE layer on its own."""
    return MoELayer.forward(layer, x, tokens)


@pytest.mark.parametrize("stage2", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,token", [((0, 2), 5), ((3, 0), 5), ((3, 2), 1)], ids=["no-steps", "no-rows", "all-pads"])
def test_empty_batch_passes_through(layer, stage2, training, shape, token):
    if stage2:
        layer.routing.end_stage1(0)
    layer.train(training)
    steps, rows = shape
    x = torch.randn(steps, rows, DIM, requires_grad=True)
    y, aux = run(layer, x, torch.full((rows, steps), token))
    assert torch.equal(y, x)
    assert int(aux["tokens"]) == 0 and int(aux["load"].sum()) == 0
    losses = [v for k, v in aux.items() if k.endswith("_loss")]
    assert all(float(v) == 0.0 for v in losses)
    (y.sum() + sum(losses)).backward()  # the backward pass survives too
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("stage2", [False, True])
def test_all_tokens_on_one_expert_with_capacity_factor_1(layer, stage2):
    """Collapsed routing with --capacity-factor 1: expert 0 takes its capacity, the rest pass through."""
    with torch.no_grad():
        layer.routing.centroids.zero_()  # every affinity ties: argmax picks expert 0
        layer.routing.distilled_router.centroids.zero_()
    if stage2:
        layer.routing.end_stage1(0)
    layer.capacity_factor = 1.0
    steps, rows, experts = 8, 4, layer.num_experts
    x = torch.randn(steps, rows, DIM, requires_grad=True)
    y, aux = run(layer, x, torch.randint(4, 40, (rows, steps)))
    capacity = steps * rows // experts
    assert aux["load"].tolist() == [steps * rows, 0, 0, 0]
    assert int(aux["dropped"]) == steps * rows - capacity
    changed = (y != x).any(-1).reshape(-1)  # time-major, as routed
    assert int(changed.sum()) == capacity and bool(changed[:capacity].all())  # the first tokens fit, in order
    loss = y.pow(2).sum() + sum(v for k, v in aux.items() if k.endswith("_loss"))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_non_finite_affinities_still_route(layer):
    """Decision: NaN affinity = 0, ±inf = ±largest float. Valid expert, finite gate, finite losses."""
    routing = layer.routing
    n = 6
    h = torch.randn(n, DIM)
    h[1] = float("nan")
    h[2] = float("inf")
    h[3, 0] = float("-inf")
    tokens = torch.randint(4, 40, (1, n))
    out = routing(h, TokenView(tokens, n, None))
    assert out.expert.dtype == torch.long and bool(((out.expert >= 0) & (out.expert < routing.num_experts)).all())
    assert torch.isfinite(out.gate).all()
    assert all(torch.isfinite(v) for v in out.losses.values())
    # finite tokens route exactly as they would without the broken ones beside them
    alone = routing(h[[0, 4, 5]], TokenView(tokens[:, [0, 4, 5]], 3, None))
    assert torch.equal(out.expert[[0, 4, 5]], alone.expert)


def test_non_finite_hidden_state_does_not_break_the_layer(layer):
    x = torch.randn(4, 2, DIM)
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    tokens = torch.randint(4, 40, (2, 4))
    y, aux = run(layer, x, tokens)
    finite = torch.isfinite(x).all(-1)
    reference, _ = run(layer, torch.where(finite[..., None], x, torch.zeros_like(x)), tokens)
    assert torch.allclose(y[finite], reference[finite], atol=1e-6)  # no NaN leaks into other tokens
    assert all(torch.isfinite(v) for k, v in aux.items() if k.endswith("_loss"))


@pytest.mark.parametrize("stage2", [False, True])
def test_autocast_keeps_routing_gate_and_losses_in_float32(layer, stage2):
    """--amp (and CPU autocast to bfloat16): experts compute in low precision, routing does not."""
    if stage2:
        layer.routing.end_stage1(0)
    x = torch.randn(6, 3, DIM)
    tokens = torch.randint(4, 40, (3, 6))
    captured = []
    layer.routing.register_forward_hook(lambda m, i, out: captured.append(out))
    run(layer, x, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(layer, x, tokens)
        scores = layer.routing.distilled_router(tokens, 6)
    full, mixed = captured
    assert scores.dtype == torch.float32
    assert torch.equal(full.expert, mixed.expert)  # bit-identical decisions
    assert mixed.gate.dtype == torch.float32 and torch.equal(full.gate, mixed.gate)
    for name, value in mixed.losses.items():
        assert value.dtype == torch.float32 and torch.equal(value, full.losses[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_routes_in_float32(layer, dtype):
    """--fp16 / --bf16 cast the whole model; affinities, gate and aux losses are still computed in float32."""
    x = torch.randn(6, 3, DIM).to(dtype)
    tokens = torch.randint(4, 40, (3, 6))
    captured = []
    layer.routing.register_forward_hook(lambda m, i, out: captured.append(out))
    reference_centroids = layer.routing.centroids.detach().to(dtype).float()
    layer.to(dtype)
    y, _ = run(layer, x, tokens)
    out = captured[0]
    assert y.dtype == dtype
    assert out.gate.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    expected = (x.reshape(-1, DIM).float() @ reference_centroids.t()).argmax(-1)
    assert torch.equal(out.expert, expected)


@pytest.mark.slow
def test_fp16_training_keeps_the_frozen_router_fixed(tmp_path):
    """--fp16 --fp16-no-flatten-grads (runs on CPU too): the stage-2 router is bit-identical from the switch on,
    and the logged aux losses are finite."""
    from fairseq import checkpoint_utils

    save_dir = str(tmp_path / "ckpt")
    log = helpers.run_fairseq_train(helpers.train_lm_args(
        helpers.tiny_lm_data(tmp_path), save_dir, "--fp16", "--fp16-no-flatten-grads", "--on-cpu-convert-precision",
        "--save-interval-updates", 2, stage1=2, max_update=6), str(tmp_path / "train.log"))
    assert "num_updates 6" in log and "balance_loss nan" not in log
    models = {u: checkpoint_utils.load_checkpoint_to_cpu(f"{save_dir}/checkpoint_1_{u}.pt")["model"] for u in (2, 4, 6)}
    router = [k for k in models[4] if ".distilled_router." in k]
    assert [helpers.stage2_began(models[u]) for u in (2, 4, 6)] == [None, 2, 2]  # began at the step after 2 updates
    assert "loss_scale 128" in log  # fairseq's FP16Optimizer ran (checkpoints are saved in float32)
    assert any(not torch.equal(models[2][k], models[4][k]) for k in router)  # it learned in stage 1
    assert all(torch.equal(models[4][k], models[6][k]) for k in router)  # and stayed frozen in stage 2
