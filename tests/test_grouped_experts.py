"""The experts' two implementations (one grouped GEMM per projection, or a loop over experts) and their
checkpoint layout: one entry per expert, keyed by global id, as before the weights were stacked."""
import copy

import pytest
import torch
import torch.nn as nn

from fairseq_stablemoe.moe import MoEConfig, Vocabulary, build_moe_layer, expert_bank
from fairseq_stablemoe.moe import experts as experts_module
from fairseq_stablemoe.moe.experts import Experts, build_expert, grouped_mm_works
from fairseq_stablemoe.legacy_optimizer_state import legacy_parameter_names
from fairseq_stablemoe.moe.expert_keys import is_expert_parameter

DIM, FFN, SUBLAYERS = 16, 32, 2
LOADS = {"balanced": [5, 5, 5, 5], "empty experts": [0, 9, 0, 3], "one expert takes all": [0, 0, 12, 0],
         "no token": [0, 0, 0, 0]}
needs_grouped = pytest.mark.skipif(not grouped_mm_works("cpu", torch.float32), reason="no torch._grouped_mm")


def trained_experts(global_ids=range(4), dtype=torch.float32, activation="relu"):
    """Experts with non-zero output projections (fresh ones are the identity), the same for a given seed."""
    experts = Experts(global_ids, DIM, FFN, SUBLAYERS, activation, seed=7)
    with torch.no_grad():
        for p in experts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return experts.to(dtype)


def run(experts, impl, x, counts, autocast=False):
    """Output, input gradient and parameter gradients (zeros where none) of one forward/backward."""
    experts.impl = impl
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = experts(x, counts)
    (y.float() * torch.linspace(-1, 1, x.size(1), device=x.device)).sum().backward()
    grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731
    return y.detach(), grad(x), {n: grad(p) for n, p in experts.named_parameters()}


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def check_bf16_against_float32(experts, x, counts, autocast):
    """bfloat16 (weights cast, or float32 weights under autocast): the grouped path is no further than the loop
    from the float32 result of the same (bf16-rounded) weights and input, for the output and every gradient;
    and the two paths' outputs agree to bf16 precision. Use a smooth activation: the paths round at different
    places (grouped_mm rounds before the bias add, nn.Linear after), so with ReLU a pre-activation within one
    rounding of 0 may flip, and that token's gradient with it, in either path."""
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(p.bfloat16().float())
    x = x.bfloat16().float()
    reference = run(experts, "loop", x, counts)
    if not autocast:
        experts, x = copy.deepcopy(experts).bfloat16(), x.bfloat16()
    grouped, loop = (run(experts, impl, x, counts, autocast) for impl in ("grouped", "loop"))
    assert grouped[0].dtype == loop[0].dtype == x.dtype  # the residual stream keeps its dtype under autocast
    assert relative_error(grouped[0], loop[0]) < 1e-2
    pairs = {"output": (grouped[0], loop[0], reference[0]), "input grad": (grouped[1], loop[1], reference[1])}
    pairs.update({name: (grouped[2][name], loop[2][name], g) for name, g in reference[2].items()})
    for name, (g, lo, ref) in pairs.items():
        if ref.any():
            assert relative_error(g, ref) <= 1.25 * relative_error(lo, ref) + 2e-3, name
        else:
            assert not g.any() and not lo.any(), name
    return grouped


@needs_grouped
@pytest.mark.parametrize("load", list(LOADS))
def test_grouped_and_loop_give_the_same_outputs_and_gradients(load):
    counts = LOADS[load]
    experts = trained_experts()
    x = torch.randn(sum(counts), DIM, generator=torch.Generator().manual_seed(0))
    grouped, loop = run(experts, "grouped", x, counts), run(experts, "loop", x, counts)
    torch.testing.assert_close(grouped[0], loop[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1], loop[1], rtol=1e-5, atol=1e-5)
    for name, g in loop[2].items():
        torch.testing.assert_close(grouped[2][name], g, rtol=1e-5, atol=1e-5, msg=name)
        for j, n in enumerate(counts):
            if n == 0:  # an expert without tokens gets no gradient
                assert not grouped[2][name][:, j].any(), name
    if load == "empty experts":
        assert loop[2]["ff2_weight"][:, 1].abs().sum() > 0


@needs_grouped
@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "autocast-bf16"])
def test_grouped_is_as_accurate_as_the_loop_in_bf16(load, autocast):
    counts = LOADS[load]
    x = torch.randn(sum(counts), DIM, generator=torch.Generator().manual_seed(0))
    grouped = check_bf16_against_float32(trained_experts(activation="gelu"), x, counts, autocast)
    for j, n in enumerate(counts):
        if n == 0:
            assert not grouped[2]["ff1_bias"][:, j].any()


def test_loop_is_each_expert_on_its_rows():
    experts, counts = trained_experts(), [2, 0, 3, 1]
    x = torch.randn(6, DIM)
    experts.impl = "loop"
    y = experts(x, counts)
    rows = x.split(counts)
    expected = torch.cat([experts.expert(i)(rows[i]) for i in range(4)])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def probe(monkeypatch, answer):
    """experts.grouped_mm_works replaced by one that answers `answer` and records what it was asked."""
    asked = []

    def grouped_mm_works(device_type, dtype):
        asked.append((device_type, dtype))
        return answer

    monkeypatch.setattr(experts_module, "grouped_mm_works", grouped_mm_works)
    return asked


def test_grouped_runs_where_the_probe_says_it_runs_and_the_rows_are_16_byte_aligned(monkeypatch):
    x = torch.zeros(4, DIM)
    asked = probe(monkeypatch, True)
    assert Experts([0], DIM, FFN, 1).grouped_runs(x) and asked == [("cpu", torch.float32)]
    # rows of dim x dtype size and FFN x dtype size bytes: (4, 8) is aligned in float32, not in bfloat16 (8 bytes)
    assert Experts([0], 4, 8, 1).grouped_runs(torch.zeros(4, 4))
    assert not Experts([0], 4, 8, 1).grouped_runs(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not Experts([0], 8, 12, 1).grouped_runs(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not Experts([0], 6, FFN, 1).grouped_runs(torch.zeros(4, 6))  # rows of 24 bytes
    asked.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the products' dtype is autocast's, not the input's
        assert Experts([0], DIM, FFN, 1).grouped_runs(x) and asked == [("cpu", torch.bfloat16)]
        assert not Experts([0], 4, 8, 1).grouped_runs(torch.zeros(4, 4))
    probe(monkeypatch, False)  # a torch without a grouped GEMM, or a dtype it refuses
    assert not Experts([0], DIM, FFN, 1).grouped_runs(x)


def test_auto_takes_the_loop_on_cpu_and_an_explicit_impl_is_kept(monkeypatch):
    x = torch.zeros(4, DIM)
    for answer in (True, False):
        probe(monkeypatch, answer)
        assert not Experts([0], DIM, FFN, 1).uses_grouped(x)  # CPU: the loop, measured faster there
        assert Experts([0], DIM, FFN, 1, impl="grouped").uses_grouped(x)
        assert not Experts([0], DIM, FFN, 1, impl="loop").uses_grouped(x)
    with pytest.raises(ValueError, match="impl"):
        Experts([0], DIM, FFN, 1, impl="fast")


@pytest.mark.parametrize("impl, chosen", [("auto", "LoopProducts"), ("loop", "LoopProducts"),
                                          pytest.param("grouped", "GroupedProducts", marks=needs_grouped)])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_the_implementation_chosen_is_the_one_that_runs(monkeypatch, impl, chosen, grad):
    """Experts.forward takes the products its uses_grouped chose (LoopProducts or GroupedProducts), and gets the
    experts' outputs with them."""
    built = []

    def recorded(cls):
        class Recorded(cls):
            def __init__(self, *args):
                built.append(cls.__name__)
                super().__init__(*args)
        return Recorded

    for name in ("LoopProducts", "GroupedProducts"):
        monkeypatch.setattr(expert_bank, name, recorded(getattr(expert_bank, name)))
    experts, counts = trained_experts(), [2, 0, 3, 1]
    experts.impl = impl
    x = torch.randn(6, DIM)
    with torch.set_grad_enabled(grad):
        y = experts(x, counts)
    assert built == [chosen]
    torch.testing.assert_close(y, torch.cat([experts.expert(i)(r) for i, r in enumerate(x.split(counts))]),
                               rtol=1e-5, atol=1e-5)


class PerExpertModules(nn.Module):
    """The layout of the plugin's experts before they were stacked: one module per expert, by global id."""

    def __init__(self, global_ids, seed):
        super().__init__()
        experts = {}
        for i in global_ids:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                experts[str(i)] = build_expert(DIM, FFN, SUBLAYERS)
        self.experts = nn.ModuleDict(experts)


def test_checkpoint_layout_is_unchanged_and_old_checkpoints_load():
    old = PerExpertModules(range(4), seed=7)
    stacked = Experts(range(4), DIM, FFN, SUBLAYERS, seed=7)  # same seed: the same initial weights
    assert list(stacked.state_dict()) == list(old.state_dict())
    for key, value in old.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[key], value, rtol=0, atol=0)

    with torch.no_grad():
        for p in old.parameters():
            p.normal_()
    fresh = Experts(range(4), DIM, FFN, SUBLAYERS, seed=1)
    fresh.load_state_dict(old.state_dict())  # strict: every key used, none missing
    x = torch.randn(3, DIM)
    for i in range(4):
        torch.testing.assert_close(fresh.expert(i)(x), old.experts[str(i)](x), rtol=1e-6, atol=1e-6)


def test_a_rank_loads_its_own_experts_from_a_full_checkpoint():
    full = trained_experts()
    rank1 = Experts([2, 3], DIM, FFN, SUBLAYERS, seed=99)
    rank1.load_state_dict(full.state_dict())
    x = torch.randn(3, DIM)
    for i in (2, 3):
        torch.testing.assert_close(rank1.expert(i)(x), full.expert(i)(x), rtol=0, atol=0)
    assert set(rank1.state_dict()) == {k for k in full.state_dict() if k.split(".")[1] in ("2", "3")}


def test_loading_reports_missing_wrong_shaped_and_unknown_entries():
    state = trained_experts().state_dict()
    del state["experts.3.1.ff1.bias"]
    state["experts.0.0.ff1.weight"] = torch.zeros(FFN + 1, DIM)
    state["ff1_weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as error:
        Experts(range(4), DIM, FFN, SUBLAYERS).load_state_dict(state)
    for fragment in ("experts.3.1.ff1.bias", "size mismatch for experts.0.0.ff1.weight", "ff1_weight"):
        assert fragment in str(error.value)


def test_reshard_knows_the_per_expert_parameter_names_of_old_optimizer_states():
    cfg = MoEConfig(moe_experts=4, moe_sublayers=SUBLAYERS, moe_ffn_embed_dim=FFN)
    from fairseq.data import Dictionary
    layer = nn.ModuleDict({"moe": build_moe_layer(cfg, DIM, FFN, Vocabulary.of(Dictionary()))})
    old = copy.deepcopy(layer)
    old.moe.experts = PerExpertModules(range(4), seed=0)  # same place in the module order
    assert legacy_parameter_names(layer, cfg, 1) == [n for n, p in old.named_parameters() if p.requires_grad]
    assert all(is_expert_parameter(n) for n, _ in layer.moe.experts.named_parameters(prefix="moe.experts"))
    assert all(is_expert_parameter(n) for n, _ in old.moe.experts.named_parameters(prefix="moe.experts"))
    assert not any(is_expert_parameter(n) for n, _ in layer.moe.routing.named_parameters(prefix="moe.routing"))


def test_reshard_keeps_the_shared_parameters_state_of_a_per_expert_optimizer_state(tmp_path, caplog):
    """A checkpoint from before the stacking, resharded: its optimizer state (one entry per expert parameter) keeps
    the shared parameters' state and drops the experts' (resuming converts it instead: test_expert_bank.py)."""
    import helpers
    from fairseq_stablemoe.moe.expert_keys import trainable_names
    from fairseq_stablemoe.reshard_checkpoint import reshard_optimizer_state

    cfg, _, model, _ = helpers.build_for_training(helpers.tiny_lm_data(tmp_path))
    legacy = legacy_parameter_names(model, cfg.model, 1)
    shapes = dict(model.named_parameters())
    moments = {i: {"exp_avg": torch.full(shapes[n].shape if n in shapes else (1,), float(i))}
               for i, n in enumerate(legacy)}
    old = {"state": moments, "param_groups": [{"params": list(range(len(legacy)))}]}
    new_names = trainable_names(model)
    with caplog.at_level("WARNING"):
        resharded = reshard_optimizer_state(old, legacy, new_names)
    experts_per_layer = 4 * 1 * 6  # experts x sublayers x tensors
    assert f"dropped the optimizer state of {experts_per_layer} expert parameters" in caplog.text
    for index, name in enumerate(new_names):
        if is_expert_parameter(name):
            assert index not in resharded["state"]
        else:
            assert torch.equal(resharded["state"][index]["exp_avg"], moments[legacy.index(name)]["exp_avg"])
