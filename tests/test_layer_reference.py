"""The MoE layer's sort-and-slice computation equals a naive token-by-token one, values and gradients."""
import pytest
import torch

from fairseq_stablemoe.moe import MoEConfig, Vocabulary, build_moe_layer
from fairseq_stablemoe.moe.experts import CHECKPOINT_NAMES
from fairseq_stablemoe.moe.layer import inverse_permutation
from fairseq_stablemoe.moe.routing import TokenView

PAD, VOCAB, EXPERTS, DIM, SUBLAYERS = 1, 20, 4, 16, 2


def make_layer(stage, capacity_factor=0.0):
    torch.manual_seed(0)
    cfg = MoEConfig(moe_experts=EXPERTS, moe_sublayers=SUBLAYERS, moe_routing="stablemoe", stage1_updates=0,
                    distilled_router="wordemb", distilled_dim=8, capacity_factor=capacity_factor)
    layer = build_moe_layer(cfg, DIM, 32, Vocabulary(VOCAB, PAD))
    with torch.no_grad():
        for p in layer.experts.parameters():  # ff2 starts at zero: make every expert do something
            p.add_(0.1 * torch.randn_like(p))
        layer.routing.centroids.mul_(20)  # spread the gates away from 0.5
    if stage == 2:
        layer.routing.end_stage1(0)
    return layer.train()


def inputs(seq=7, bsz=3):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, VOCAB, (bsz, seq), generator=g)
    tokens[0, :2] = PAD
    tokens[2, 5] = PAD
    x = torch.randn(seq, bsz, DIM, generator=g, requires_grad=True)
    return x, tokens


def naive(layer, x, tokens, capacity=None):
    """h_t + σ(s_{t,e}) · (expert_e(h_t) − h_t), one token at a time; pads and tokens over capacity unchanged."""
    seq, bsz, _ = x.shape
    ids = tokens[:, -seq:].t().reshape(-1)
    flat = x.reshape(-1, DIM)
    keep = ids.ne(PAD)
    routed = flat[keep]
    expert = layer.routing.decide(routed.detach(), TokenView(tokens, seq, keep.nonzero().squeeze(1)))
    taken = [0] * EXPERTS
    rows, n = [], 0
    for t in range(flat.size(0)):
        h = flat[t]
        if not keep[t]:
            rows.append(h)
            continue
        e = int(expert[n])
        n += 1
        taken[e] += 1
        if capacity is not None and taken[e] > capacity:
            rows.append(h)
            continue
        gate = torch.sigmoid(layer.routing.centroids[e].float() @ h.float())
        y = layer.experts.expert(e)(h.unsqueeze(0)).squeeze(0)
        rows.append(h + gate * (y - h))
    return torch.stack(rows).view_as(x)


def grads(layer, x, out, weight):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    (out * weight).sum().backward()
    named = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return x.grad.clone(), named


@pytest.mark.parametrize("stage", [1, 2])
def test_layer_matches_token_by_token_reference(stage):
    layer = make_layer(stage)
    x, tokens = inputs()
    weight = torch.randn_like(x)
    out, aux = layer(x, tokens)
    x_grad, param_grads = grads(layer, x, out, weight)
    ref = naive(layer, x, tokens)
    ref_x_grad, ref_param_grads = grads(layer, x, ref, weight)

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x_grad, ref_x_grad)
    assert ref_param_grads.keys() == param_grads.keys()
    for name, g in ref_param_grads.items():
        torch.testing.assert_close(param_grads[name], g, msg=name)
    pads = tokens.t().eq(PAD)
    assert torch.equal(out[pads], x[pads]), "pad positions must pass through unchanged"


def test_tokens_over_capacity_pass_through_like_the_reference():
    layer = make_layer(1, capacity_factor=0.5)
    x, tokens = inputs()
    weight = torch.randn_like(x)
    n = int(tokens.ne(PAD).sum())
    capacity = max(1, int(0.5 * n / EXPERTS))
    out, aux = layer(x, tokens)
    assert int(aux["dropped"]) > 0, "the example must drop tokens to test the drop path"
    x_grad, _ = grads(layer, x, out, weight)
    ref = naive(layer, x, tokens, capacity)
    ref_x_grad, _ = grads(layer, x, ref, weight)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x_grad, ref_x_grad)


def test_inverse_permutation_undoes_the_sort():
    order = torch.randperm(50)
    inverse = inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(50))
    assert torch.equal(inverse[order], torch.arange(50))


def test_routing_scores_stay_float32_under_autocast():
    layer = make_layer(1)
    x, tokens = inputs()
    router = layer.routing.distilled_router
    plain = router(tokens, x.size(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(tokens, x.size(0))
        routing = layer.routing(x.reshape(-1, DIM), TokenView(tokens, x.size(0), None))
    assert mixed.dtype == torch.float32 and routing.gate.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


# --- float64: the layer against the paper's equations, written out independently ---

def expert_reference(params, prefix, h, sublayers=2):
    """An expert: pre-LN residual FFN sublayers, x + W2·relu(W1·LN(x) + b1) + b2."""
    for j in range(sublayers):
        p = lambda name: params[f"{prefix}.{j}.{name}"]  # noqa: E731
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        normed = (h - mean) / torch.sqrt(var + 1e-5) * p("norm.weight") + p("norm.bias")
        h = h + torch.relu(normed @ p("ff1.weight").T + p("ff1.bias")) @ p("ff2.weight").T + p("ff2.bias")
    return h


def equations_5_to_15(params, x, tokens, stage):
    """Returns (output T x B x C, L_bal, L_dis) of one training forward, token by token as the paper writes it."""
    seq, bsz, dim = x.shape
    ids = tokens[:, -seq:].t().reshape(-1)
    rows = [t for t in range(seq * bsz) if ids[t] != PAD]
    h = x.reshape(-1, dim)
    # the experts' weights are stacked (sublayer, expert, ...): expert e's own tensors are views of the leaves
    params = {**params, **{f"experts.experts.{e}.{j}.{key}": params[f"experts.{name}"][j, e]
                           for name, key in CHECKPOINT_NAMES.items() for j in range(SUBLAYERS)
                           for e in range(EXPERTS)}}
    E, D, E_hat = params["routing.centroids"], params["routing.distilled_router.embed.weight"], \
        params["routing.distilled_router.centroids"]
    s = {t: E @ h[t] for t in rows}  # (5)
    s_hat = {t: E_hat @ D[ids[t]] for t in rows}  # (9)
    if stage == 1:
        a = {t: int(s[t].argmax()) for t in rows}  # (6)
    else:
        a = {t: int(s_hat[t].detach().argmax()) for t in rows}  # (12, 13)
    out = []
    for t in range(seq * bsz):
        if t not in a:
            out.append(h[t])
            continue
        ffn = expert_reference(params, f"experts.experts.{a[t]}", h[t]) - h[t]
        out.append(h[t] + torch.sigmoid(s[t][a[t]]) * ffn)  # (7), (14)
    if stage == 2:
        return torch.stack(out).view_as(x), None, None  # (15): the task loss alone
    n_bar = len(rows) / EXPERTS
    load = [sum(1 for t in rows if a[t] == i) for i in range(EXPERTS)]
    balance = sum((load[i] - n_bar) / n_bar * sum(torch.sigmoid(s[t][i]) for t in rows if a[t] == i)
                  for i in range(EXPERTS))  # (8)
    distill = -sum(torch.log_softmax(s_hat[t], -1)[a[t]] for t in rows)  # (10)
    return torch.stack(out).view_as(x), balance, distill


def assert_relative(actual, expected, name, tol=1e-9):
    scale = expected.abs().max().clamp(min=1e-300)
    assert float((actual - expected).abs().max() / scale) <= tol, name


@pytest.mark.parametrize("stage", [1, 2])
def test_float64_layer_matches_the_papers_equations(stage):
    layer = make_layer(stage).double()
    x, tokens = inputs()
    x = x.detach().double().requires_grad_(True)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    alpha, beta = 0.3, 0.7

    out, aux = layer(x, tokens)
    assert out.dtype == torch.float64
    objective = (out * weight).sum() + sum(f * aux[f"{k}_loss"] for k, f in (("balance", alpha), ("distill", beta))
                                           if f"{k}_loss" in aux)
    params = dict(layer.named_parameters())
    trained = [x] + [p for p in params.values() if p.requires_grad]  # stage 2: not the frozen router
    found = dict(zip(map(id, trained), torch.autograd.grad(objective, trained, allow_unused=True)))
    grads = [found.get(id(t)) for t in [x, *params.values()]]

    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    x_ref = x.detach().clone().requires_grad_(True)
    ref_out, balance, distill = equations_5_to_15(leaves, x_ref, tokens, stage)
    ref_objective = (ref_out * weight).sum()
    if stage == 1:
        ref_objective = ref_objective + alpha * balance + beta * distill
        assert_relative(aux["balance_loss"], balance, "L_bal")
        assert_relative(aux["distill_loss"], distill, "L_dis")
    else:
        assert "balance_loss" not in aux and "distill_loss" not in aux
    ref_grads = torch.autograd.grad(ref_objective, [x_ref, *leaves.values()], allow_unused=True)

    assert_relative(out, ref_out, "output")
    for name, g, ref in zip(["x", *params], grads, ref_grads):
        g = torch.zeros_like(leaves.get(name, x)) if g is None else g
        ref = torch.zeros_like(g) if ref is None else ref
        if ref.abs().max() == 0:
            assert g.abs().max() == 0, name
        else:
            assert_relative(g, ref, f"d/d{name}")
    if stage == 2:
        router = [n for n in params if ".distilled_router." in n]
        assert router and all(grads[1 + list(params).index(n)] is None for n in router)  # frozen
