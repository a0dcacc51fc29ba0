"""The paper's equations against hand-computed values, and where gradients may (not) flow."""
import math

import pytest
import torch

from fairseq_stablemoe.moe import Experts, MoELayer
from fairseq_stablemoe.moe.distilled_router import WordEmbeddingRouter
from fairseq_stablemoe.moe.routing import TokenView, affinities
from fairseq_stablemoe.moe.routing.base import GATHER_FROM_EXPERTS
from fairseq_stablemoe.moe.routing.stablemoe import StableMoERouting, balance_loss

PAD = 1


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def make_layer(dim=4, experts=2, vocab=10, seed=0):
    torch.manual_seed(seed)
    router = WordEmbeddingRouter(vocab, experts, 3, PAD)
    routing = StableMoERouting(dim, experts, router, stage1_updates=5)
    return MoELayer(routing, Experts(range(experts), dim, 8, 1), experts, PAD)


def test_affinities_and_greedy_choice():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    E = torch.tensor([[0.5, -1.0], [0.2, 0.3]])
    s = affinities(h, E)  # Eq. 5: s_ti = E_i . h_t
    assert torch.allclose(s, torch.tensor([[0.5, 0.2], [-2.0, 0.6], [-0.5, 0.5]]))
    assert s.argmax(-1).tolist() == [0, 1, 1]  # Eq. 6


def test_balance_loss_two_experts_five_tokens():
    # tokens 0,1,2 -> expert 0; tokens 3,4 -> expert 1; n_bar = 5/2 = 2.5
    expert = torch.tensor([0, 0, 0, 1, 1])
    gate = torch.tensor([0.6, 0.7, 0.8, 0.4, 0.9])  # σ(s_{t,a_t})
    load = torch.tensor([3, 2])
    # Eq. 8: (3-2.5)/2.5*(0.6+0.7+0.8) + (2-2.5)/2.5*(0.4+0.9) = 0.2*2.1 - 0.2*1.3 = 0.16
    assert balance_loss(load, expert, gate).item() == pytest.approx(0.16)


def test_stage1_gate_output_and_losses_by_hand():
    layer = make_layer()
    layer.train()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_()  # a non-identity expert, so the gate matters
    x = torch.randn(5, 1, 4)  # T x B x C
    tokens = torch.tensor([[2, 3, 4, 5, 6]])
    out, aux = layer(x, tokens)

    h = x.view(5, 4)
    s = h @ layer.routing.centroids.t()
    a = s.argmax(-1)
    expected = torch.stack([
        h[t] + torch.sigmoid(s[t, a[t]]) * (layer.experts.expert(int(a[t]))(h[t:t + 1])[0] - h[t])
        for t in range(5)
    ])  # Eq. 7
    assert torch.allclose(out.view(5, 4), expected, atol=1e-6)

    router = layer.routing.distilled_router
    s_hat = router.embed(tokens[0]) @ router.centroids.t()  # Eq. 9
    distill = -torch.log_softmax(s_hat, -1).gather(1, a[:, None]).sum()  # Eq. 10
    assert aux["distill_loss"].item() == pytest.approx(distill.item(), rel=1e-5)
    load = torch.bincount(a, minlength=2).float()
    gate = torch.sigmoid(s.gather(1, a[:, None]).squeeze(1))
    balance = sum(((load[i] - 2.5) / 2.5) * gate[a == i].sum() for i in range(2))
    assert aux["balance_loss"].item() == pytest.approx(balance.item(), rel=1e-5)


def test_distillation_gradient_reaches_only_the_router():
    layer = make_layer()
    layer.train()
    x = torch.randn(6, 2, 4, requires_grad=True)
    _, aux = layer(x, torch.randint(2, 10, (2, 6)))
    aux["distill_loss"].backward()
    router = layer.routing.distilled_router
    assert router.embed.weight.grad.abs().sum() > 0 and router.centroids.grad.abs().sum() > 0
    assert x.grad is None
    assert layer.routing.centroids.grad is None
    assert all(p.grad is None for p in layer.experts.parameters())


def test_no_gradient_through_the_routing_decision():
    layer = make_layer()  # zero-initialised experts: f(h) = 0, so the output cannot depend on the gate
    layer.train()
    x = torch.randn(6, 2, 4, requires_grad=True)
    out, aux = layer(x, torch.randint(2, 10, (2, 6)))
    out.sum().backward()
    # the argmax is not differentiable and the gate multiplies f(h) = 0: no gradient reaches E from the output
    assert torch.count_nonzero(layer.routing.centroids.grad) == 0
    assert torch.equal(x.grad, torch.ones_like(x))


def test_balance_gradient_only_for_assigned_experts():
    torch.manual_seed(0)
    router = WordEmbeddingRouter(10, 3, 3, PAD)
    routing = StableMoERouting(4, 3, router, stage1_updates=5)
    with torch.no_grad():
        routing.centroids.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-5.0, -5.0, -5.0, -5.0]]))
    h = torch.rand(8, 4) + 0.1  # positive features: expert 2 is never chosen
    r = routing(h, TokenView(torch.randint(2, 10, (1, 8)), 8, None))
    assert 2 not in r.expert.tolist()
    r.losses["balance"].backward()
    grad = routing.centroids.grad
    assert torch.count_nonzero(grad[2]) == 0 and torch.count_nonzero(grad[:2]) > 0


def test_stage2_routes_by_frozen_router_and_gate_uses_backbone_score():
    layer = make_layer()
    layer.train()
    layer.routing.end_stage1(0)
    x = torch.randn(5, 1, 4, requires_grad=True)
    tokens = torch.tensor([[2, 3, 4, 5, 6]])
    out, aux = layer(x, tokens)
    router = layer.routing.distilled_router
    a_hat = (router.embed(tokens[0]) @ router.centroids.t()).argmax(-1)  # Eqs. 12-13
    assert torch.equal(router.table[tokens[0]], a_hat)
    assert "balance_loss" not in aux and "distill_loss" not in aux  # Eq. 15
    out.sum().backward()
    assert all(p.grad is None for p in router.parameters())  # frozen: no gradient at all
    assert layer.routing.centroids.grad is not None  # the gate σ(E·h) keeps learning (Eq. 14)


@pytest.mark.parametrize("experts", [3, GATHER_FROM_EXPERTS])  # both backward paths
def test_stage2_gate_and_its_gradients_equal_the_full_affinity_formula(experts):
    """Stage 2 differentiates only s_{t,â_t}; gate, dL/dh and dL/dE must be those of σ(gather(E·h)) (Eq. 14)."""
    routing = StableMoERouting(3, experts, WordEmbeddingRouter(10, experts, 2, PAD), stage1_updates=0)
    routing.end_stage1(0)
    routing.distilled_router.table.copy_(torch.tensor([0, 0, 2, 1, 0, 2, 1, 1, 0, 2]))
    with torch.no_grad():
        routing.centroids[:3] = torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.3, 2.0], [-0.4, 0.1, 0.7]])
    tokens = torch.tensor([[2, 3, 4, 5, 2]])  # -> experts 2, 1, 0, 2, 2: expert 2 gets three tokens
    h = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5], [1.0, 1.0, 1.0], [-2.0, 0.5, 0.0], [0.3, -0.2, 0.1]],
                     requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5])  # a loss that weighs every gate differently

    out = routing.train()(h, TokenView(tokens, 5, None))
    assert out.expert.tolist() == [2, 1, 0, 2, 2]
    (weights * out.gate).sum().backward()
    h_ref = h.detach().clone().requires_grad_()
    centroids_ref = routing.centroids.detach().clone().requires_grad_()
    gate_ref = torch.sigmoid((h_ref @ centroids_ref.t()).gather(1, out.expert[:, None]).squeeze(1))
    (weights * gate_ref).sum().backward()
    assert torch.allclose(out.gate, gate_ref, atol=1e-6)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-6)
    assert torch.allclose(routing.centroids.grad, centroids_ref.grad, atol=1e-6)
    assert h_ref.grad.abs().sum(1).gt(0).all() and centroids_ref.grad[:3].abs().sum(1).gt(0).all()  # not all 0
    # the logged agreement counts tokens whose frozen-router expert is the backbone's argmax (Eq. 6)
    assert out.stats["distill_agree"].item() == int((h_ref @ centroids_ref.t()).argmax(-1).eq(out.expert).sum())
    assert out.counts.tolist() == [1, 1, 3] + [0] * (experts - 3) and not out.stats["distill_agree"].requires_grad


def test_inference_routes_with_distilled_router_even_in_stage1():
    layer = make_layer()
    layer.eval()
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7]])
    _, aux = layer(torch.randn(6, 1, 4), tokens)
    router = layer.routing.distilled_router
    expected = (router.embed(tokens[0]) @ router.centroids.t()).argmax(-1)
    h = torch.randn(6, 4)
    assert torch.equal(layer.routing.decide(h, TokenView(tokens, 6, None)), h.matmul(
        layer.routing.centroids.t()).argmax(-1))  # stage-1 training target: the backbone
    layer.routing.end_stage1(0)
    assert torch.equal(layer.routing.decide(h, TokenView(tokens, 6, None)), expected)


def test_pads_pass_through_and_are_not_counted():
    layer = make_layer()
    layer.train()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_()
    x = torch.randn(4, 2, 4)
    tokens = torch.tensor([[2, 3, PAD, PAD], [4, 5, 6, 7]])
    out, aux = layer(x, tokens)
    assert torch.equal(out[2:, 0], x[2:, 0])  # pad positions unchanged
    assert aux["tokens"].item() == 6 and aux["load"].sum().item() == 6


def test_capacity_drops_overflow_tokens_unchanged():
    layer = make_layer(experts=2)
    layer.train()
    layer.capacity_factor = 1.0  # capacity = 1.0 * 6 / 2 = 3 per expert
    with torch.no_grad():
        layer.routing.centroids.copy_(torch.tensor([[1.0, 1, 1, 1], [-1.0, -1, -1, -1]]))
        for p in layer.experts.parameters():
            p.normal_()
    x = torch.rand(6, 1, 4) + 0.1  # every token prefers expert 0
    out, aux = layer(x, torch.tensor([[2, 3, 4, 5, 6, 7]]))
    assert aux["dropped"].item() == 3
    assert torch.equal(out[3:], x[3:]) and not torch.equal(out[:3], x[:3])  # the last tokens overflow

