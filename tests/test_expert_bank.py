"""The experts' bank: its hand-written backward against autograd's, the gradient memory it reuses (and when it must
not), and resuming from a checkpoint written while each expert was its own module."""
import pytest
import torch

import helpers
from fairseq_stablemoe.moe.experts import Experts

DIM, FFN, SUBLAYERS = 8, 16, 2


def bank(activation="relu", dtype=torch.float64, ids=range(4)):
    experts = Experts(ids, DIM, FFN, SUBLAYERS, activation, seed=3, impl="loop").to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=dtype) * 0.3)
    return experts


def autograd_reference(experts, x, counts):
    """Each expert by fairseq's LayerNorm and nn.Linear ops through autograd, on its rows."""
    rows = x.split(counts)
    return torch.cat([experts.expert_forward(j, rows[j]) for j in range(len(counts))])


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_the_bank_s_backward_is_autograd_s_in_float64(activation):
    experts, counts = bank(activation), [3, 0, 5, 1]  # an expert without rows gets a zero gradient
    x = torch.randn(sum(counts), DIM, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(sum(counts), DIM, dtype=torch.float64)
    results = []
    for run in (lambda: experts(x, counts), lambda: autograd_reference(experts, x, counts)):
        experts.zero_grad(set_to_none=True)
        x.grad = None
        (run() * weights).sum().backward()
        results.append([x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                           for p in experts.parameters()])
    for bank_grad, reference in zip(*results):
        torch.testing.assert_close(bank_grad, reference, rtol=1e-9, atol=1e-12)
    assert not any(p.grad[:, 1].any() for p in experts.parameters())



@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_the_loop_is_autograd_bit_for_bit_in_float32(activation):
    """The same kernels in the same order: the in-place temporaries (ReLU, its backward, the residual sums) and
    the hand-written backward change no bit of the output or of any gradient."""
    experts, counts = bank(activation, dtype=torch.float32), [30, 0, 7, 12]
    x = torch.randn(sum(counts), DIM, requires_grad=True)
    weights = torch.randn(sum(counts), DIM)
    results = []
    for run in (lambda: experts(x, counts), lambda: autograd_reference(experts, x, counts)):
        experts.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                                 for p in experts.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))

def step(experts, x, counts):
    experts(x, counts).pow(2).sum().backward()


def test_gradient_memory_is_reused_once_nobody_holds_the_last_gradient():
    experts, counts = bank(), [2, 2, 2, 2]
    x = torch.randn(8, DIM, dtype=torch.float64)
    step(experts, x, counts)
    first = experts.ff1_weight.grad.data_ptr()
    experts.zero_grad(set_to_none=True)
    step(experts, x, counts)
    assert experts.ff1_weight.grad.data_ptr() == first  # no fresh parameter-sized allocation per step


def test_a_gradient_someone_holds_is_never_overwritten():
    experts, counts = bank(), [2, 2, 2, 2]
    x = torch.randn(8, DIM, dtype=torch.float64)
    step(experts, x, counts)
    kept = experts.ff1_weight.grad
    snapshot = kept.clone()
    experts.zero_grad(set_to_none=True)
    step(experts, 2 * x, counts)
    torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)
    assert experts.ff1_weight.grad.data_ptr() != kept.data_ptr()


def test_gradients_accumulate_over_backwards_and_hooks_see_them():
    experts, counts = bank(), [2, 2, 2, 2]
    x = torch.randn(8, DIM, dtype=torch.float64)
    step(experts, x, counts)
    once = experts.ff2_weight.grad.clone()
    seen = []
    experts.ff2_weight.register_hook(lambda g: seen.append(g.clone()))
    step(experts, x, counts)  # --update-freq 2: the second backward adds to the first
    torch.testing.assert_close(experts.ff2_weight.grad, 2 * once, rtol=1e-12, atol=0)
    torch.testing.assert_close(seen[0], once, rtol=1e-12, atol=0)


def unstack(optim_state, names, legacy_names, banks):
    """The optimizer state as the per-expert-module code kept it: one entry per expert parameter, in its order."""
    from fairseq_stablemoe.moe.expert_keys import CHECKPOINT_NAMES

    by_name = {name: optim_state["state"][i] for i, name in enumerate(names)}
    state = {}
    for index, legacy in enumerate(legacy_names):
        if legacy in by_name:
            state[index] = by_name[legacy]
            continue
        owner, rest = legacy.split(".experts.experts.")
        expert_id, sublayer, key = rest.split(".", 2)
        leaf = next(k for k, v in CHECKPOINT_NAMES.items() if v == key)
        j = banks[owner + ".experts"].global_ids.index(int(expert_id))
        entry = by_name[f"{owner}.experts.{leaf}"]
        state[index] = {k: v[int(sublayer), j].clone() if torch.is_tensor(v) and v.dim() else v
                        for k, v in entry.items()}
    return {**optim_state, "state": state,
            "param_groups": [{**optim_state["param_groups"][0], "params": list(range(len(legacy_names)))}]}


@pytest.mark.slow
def test_a_per_expert_module_checkpoint_resumes_with_its_optimizer_state(tmp_path):
    from fairseq_stablemoe.legacy_optimizer_state import StackExpertMoments
    from fairseq_stablemoe.legacy_optimizer_state import legacy_parameter_names

    data, save_dir = helpers.trained_tiny_lm(tmp_path, stage1=2, max_update=3)
    state = torch.load(f"{save_dir}/checkpoint_last.pt", weights_only=True)
    cfg, _, model, _ = helpers.build_for_training(data)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    legacy = legacy_parameter_names(model, cfg.model, 1)
    banks = {n: m for n, m in model.named_modules() if isinstance(m, Experts)}
    old = unstack(state["last_optimizer_state"], names, legacy, banks)
    assert len(old["state"]) > len(state["last_optimizer_state"]["state"])

    restacked = StackExpertMoments(model, legacy)(old)
    for index, entry in state["last_optimizer_state"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(restacked["state"][index][key]), torch.as_tensor(value)), key

    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    torch.save(dict(state, last_optimizer_state=old), legacy_dir / "checkpoint_last.pt")
    log = helpers.run_fairseq_train(helpers.train_lm_args(data, str(legacy_dir), stage1=2, max_update=5),
                                    str(tmp_path / "resume.log"))
    assert "was written while each expert was its own module" in log
    assert "| num_updates 5" in log or "num_updates 5" in log
    resumed = torch.load(legacy_dir / "checkpoint_last.pt", weights_only=True)
    assert len(resumed["last_optimizer_state"]["state"]) == len(state["last_optimizer_state"]["state"])


def test_frozen_experts_get_no_gradient_and_inference_saves_nothing():
    experts, counts = bank(), [3, 0, 5, 1]
    x = torch.randn(9, DIM, dtype=torch.float64, requires_grad=True)
    experts.requires_grad_(False)
    experts(x, counts).sum().backward()
    assert all(p.grad is None for p in experts.parameters()) and x.grad is not None
    with torch.no_grad():
        y = experts(x, counts)
    assert y.grad_fn is None
    torch.testing.assert_close(y, autograd_reference(experts, x.detach(), counts), rtol=1e-12, atol=1e-12)
