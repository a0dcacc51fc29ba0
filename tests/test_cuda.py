"""On a GPU (skipped without one; `pytest -m cuda` runs only these): fairseq-train through the stage switch in
fp16, memory-efficient fp16, --amp and bf16; routing in float32; incremental decoding; the experts' grouped GEMM
against their loop. benchmarks/gpu_check.py runs them first.

STABLEMOE_TEST_DEVICE=cpu runs the same tests on CPU (what `gpu_check.py --dry-run` does to check them)."""
import copy
import os

import pytest
import torch

import fairseq_stablemoe  # noqa: F401  (registers the plugin for in-process loading)
from fairseq_stablemoe.moe import MoELayer
from fairseq_stablemoe.moe.experts import Experts, grouped_mm_works
from helpers import build_lm, run_cli, saved_stage, tiny_lm_data, train_lm_args
from test_grouped_experts import check_bf16_against_float32
from test_mixed_precision import check_bf16_run, train_bf16

DEVICE = os.environ.get("STABLEMOE_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU")]
STAGE1, MAX_UPDATE = 4, 10


def load(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lm_data(tmp_path_factory.mktemp("cuda"))


@pytest.mark.parametrize("flags", [["--fp16", "--fp16-no-flatten-grads"], ["--memory-efficient-fp16"], ["--amp"]],
                         ids=["fp16", "memory-efficient-fp16", "amp"])
def test_half_precision_trains_through_the_switch_on_gpu(data, tmp_path, flags):
    if DEVICE == "cpu":
        flags = flags + ["--on-cpu-convert-precision"]
    args = [a for a in train_lm_args(data, tmp_path, "--save-interval-updates", STAGE1, *flags, stage1=STAGE1,
                                     max_update=MAX_UPDATE) if a != "--cpu" or DEVICE == "cpu"]
    log = run_cli("fairseq_cli.train", args)
    assert log.count("enter stage 2") == 1 and f"num_updates={MAX_UPDATE}" in log
    assert "loss=nan" not in log and "balance_loss=nan" not in log and "loss_scale=" in log
    at_switch, end = load(tmp_path / f"checkpoint_1_{STAGE1}.pt"), load(tmp_path / "checkpoint_last.pt")
    assert saved_stage(end) == 2
    router = [k for k in end if ".distilled_router." in k and not k.endswith("table")]
    assert router and all(torch.equal(at_switch[k], end[k]) for k in router)  # frozen: bit-identical
    assert not torch.equal(at_switch["decoder.layers.1.routing.centroids"], end["decoder.layers.1.routing.centroids"])


def test_bf16_through_hydra_trains_through_the_switch_on_gpu(tmp_path, data):
    log, at_switch, end = train_bf16(tmp_path, data, cpu=DEVICE == "cpu")
    assert end["cfg"]["common"]["cpu"] == (DEVICE == "cpu")
    check_bf16_run(log, at_switch, end)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    model, task = build_lm(tmp_path_factory.mktemp("lm"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts and routers away from their (identity) init
    return model.to(DEVICE), task


@pytest.mark.parametrize("precision", ["autocast-fp16", "autocast-bf16", "fp16-model", "bf16-model"])
@pytest.mark.parametrize("stage2", [False, True])
def test_routing_stays_float32_on_gpu(lm, precision, stage2):
    model, task = lm
    layer = copy.deepcopy(model.moe_layers()[0]).train()
    if stage2:
        layer.routing.end_stage1(0)
    dtype = torch.float16 if "fp16" in precision else torch.bfloat16
    x = torch.randn(16, 4, layer.experts.dim, device=DEVICE)
    tokens = torch.randint(4, len(task.dictionary), (4, 16), device=DEVICE)
    captured = []
    layer.routing.register_forward_hook(lambda m, i, out: captured.append(out))
    MoELayer.forward(layer, x, tokens)
    if precision.startswith("autocast"):
        with torch.autocast(DEVICE, dtype=dtype):
            MoELayer.forward(layer, x, tokens)
    else:
        layer.to(dtype)
        MoELayer.forward(layer, x.to(dtype), tokens)
    full, mixed = captured
    assert mixed.gate.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in mixed.losses.values())
    if precision.startswith("autocast") or stage2:  # same inputs and float32 routing: the same decisions
        assert torch.equal(full.expert, mixed.expert)


def test_incremental_decoding_equals_full_forward_on_gpu(lm):
    model, task = lm
    model.eval()
    with torch.no_grad():
        tokens = torch.randint(4, len(task.dictionary), (3, 9), device=DEVICE)
        full = model(tokens)[0]
        state = {}
        steps = [model.decoder.forward(tokens[:, : t + 1], incremental_state=state)[0] for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("counts", [[300, 0, 5, 723, 0, 64, 1, 11], [0, 0, 0, 1024, 0, 0, 0, 0]],
                         ids=["uneven-with-empty", "one-expert-takes-all"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "autocast-bf16"])
def test_grouped_and_loop_experts_agree_in_bf16_on_gpu(counts, autocast):
    assert grouped_mm_works(DEVICE, torch.bfloat16)
    experts = Experts(range(8), 128, 512, 2, "gelu", seed=3).to(DEVICE)
    with torch.no_grad():
        for p in experts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(DEVICE) * 0.05)
    x = torch.randn(sum(counts), 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert experts.grouped_runs(x.bfloat16()) and experts.uses_grouped(x.bfloat16()) == (DEVICE == "cuda")
    check_bf16_against_float32(experts, x, counts, autocast)
