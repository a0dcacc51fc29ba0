"""The MoE layer's sort-and-slice computation equals a naive token-by-token one, values and gradients."""
import pytest
import torch

from fairseq_stablemoe.moe import MoEConfig, build_moe_layer
from fairseq_stablemoe.moe.layer import inverse_permutation
from fairseq_stablemoe.moe.routing import TokenView

PAD, VOCAB, EXPERTS, DIM = 1, 20, 4, 16


class Dictionary:
    count = [1] * VOCAB

    def __len__(self):
        return VOCAB

    def pad(self):
        return PAD


def make_layer(stage, capacity_factor=0.0):
    torch.manual_seed(0)
    cfg = MoEConfig(moe_experts=EXPERTS, moe_sublayers=2, moe_routing="stablemoe", stage1_updates=0,
                    distilled_router="wordemb", distilled_dim=8, capacity_factor=capacity_factor)
    layer = build_moe_layer(cfg, DIM, 32, Dictionary())
    with torch.no_grad():
        for p in layer.experts.parameters():  # ff2 starts at zero: make every expert do something
            p.add_(0.1 * torch.randn_like(p))
        layer.routing.centroids.mul_(20)  # spread the gates away from 0.5
    if stage == 2:
        layer.routing.enter_stage2()
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
    out = layer(x, tokens)
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
    out = layer(x, tokens)
    assert int(layer.aux["dropped"]) > 0, "the example must drop tokens to test the drop path"
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
