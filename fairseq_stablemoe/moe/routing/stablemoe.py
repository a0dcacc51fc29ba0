"""StableMoE routing (Dai et al., ACL 2022, §3). Equation numbers are the paper's.

Stage 1 learns a routing strategy and distils it into a light router:
    s_{t,i} = E_iᵀ h_t                                              (5)  affinities
    a_t     = argmax_i s_{t,i}                                      (6)  greedy top-1
    h'_t    = h_t + σ(s_{t,a_t}) · FFN_{a_t}(h_t)                   (7)  sigmoid gate
    L_bal   = Σ_i (|A_i| − n̄)/n̄ · Σ_{t∈A_i} σ(s_{t,i})             (8)  (α is the criterion's --balance-factor)
    ŝ_{t,i} = Ê_iᵀ D(x_t)                                           (9)  distilled router
    L_dis   = − Σ_t log softmax(ŝ_t)[a_t]                           (10)
Stage 2 routes with the frozen distilled router; the gate keeps the backbone score:
    â_t     = argmax_i ŝ_{t,i}                                      (12, 13)
    h'_t    = h_t + σ(s_{t,â_t}) · FFN_{â_t}(h_t)                   (14)
    L_S2    = L_task                                                (15)
Inference (and validation, in either stage) routes as in stage 2.

Ablation "BASE Layer + fixed routing" (paper Table 5), --stage1-assignment balanced: stage 1 assigns by BASE
layers' balanced assignment instead of (6), has no balance loss (8) (balanced by construction) and distils
that assignment by (10); stage 2 is unchanged.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distilled_router import DistilledRouter, build_distilled_router
from .base import Routing, TokenView, affinities, chosen_affinity, expert_load, load_and_counts
from .base_layer import balanced_assignment


def balance_loss(load: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Eq. 8 without α: the load term is a constant, so only σ(s_{t,a_t}) of tokens in A_i get a gradient."""
    load = load.float()
    n_bar = load.sum() / load.numel()
    overload = (load - n_bar) / n_bar.clamp(min=1e-9)  # an empty batch has load 0 everywhere
    return (overload[expert].to(gate.dtype) * gate).sum()


class StableMoERouting(nn.Module):
    loss_names = ("balance", "distill")  # what it may put in Routing.losses

    def __init__(self, dim: int, num_experts: int, distilled_router: DistilledRouter,
                 stage1_updates: int, stage1_assignment: str = "greedy"):
        super().__init__()
        self.num_experts = num_experts
        self.stage1_updates = stage1_updates
        self.balanced_stage1 = stage1_assignment == "balanced"
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))  # E
        nn.init.orthogonal_(self.centroids, gain=0.1)
        self.distilled_router = distilled_router
        # 1 or 2; saved with the model so a checkpoint says which stage it was written in
        self.register_buffer("stage", torch.tensor(1))

    @classmethod
    def build(cls, cfg, dim: int, vocab_size: int, padding_idx: int) -> "StableMoERouting":
        router = build_distilled_router(cfg, vocab_size, padding_idx)
        return cls(dim, cfg.moe_experts, router, cfg.stage1_updates, str(cfg.stage1_assignment))

    @property
    def in_stage2(self) -> bool:
        return self.distilled_router.frozen

    def enter_stage2(self):
        """Freeze the distilled router for real: no gradient, so no optimizer (momentum included) moves it."""
        self.distilled_router.freeze()
        self.stage.fill_(2)

    @torch.no_grad()
    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        """The expert each token would go to in training now, with no side effect (for routing probes)."""
        if self.in_stage2:
            return tokens.select(self.distilled_router.route(tokens.tokens, tokens.last))
        return self.stage1_assignment(affinities(h, self.centroids))

    def stage1_assignment(self, s: torch.Tensor) -> torch.Tensor:
        return balanced_assignment(s) if self.balanced_stage1 else s.detach().argmax(-1)  # (6)

    def forward(self, h: torch.Tensor, tokens: TokenView) -> Routing:
        if self.training and not self.in_stage2:
            s = affinities(h, self.centroids)  # (5), differentiable only through the gate below
            a = self.stage1_assignment(s)  # (6)
            gate = torch.sigmoid(s.gather(1, a[:, None]).squeeze(1))  # (7)
            load, counts = load_and_counts(a, self.num_experts, global_=True)
            losses = {} if self.balanced_stage1 else {"balance": balance_loss(load, a, gate)}  # (8)
            s_hat = tokens.select(self.distilled_router(tokens.tokens, tokens.last))  # (9)
            losses["distill"] = F.cross_entropy(s_hat, a, reduction="sum")  # (10)
            return Routing(
                expert=a,
                gate=gate,
                losses=losses,
                stats={"load": load, "distill_agree": (s_hat.detach().argmax(-1) == a).sum()},
                counts=counts,
            )
        a_hat = tokens.select(self.distilled_router.route(tokens.tokens, tokens.last))  # (12, 13)
        # (14) differentiates s_{t,â_t} only; s (5) comes without autograd, for the logged agreement
        s_chosen, s = chosen_affinity(h, self.centroids, a_hat)
        gate = torch.sigmoid(s_chosen)  # (14)
        agree = (a_hat == s.argmax(-1)).sum()  # logged: how often the frozen router still picks (6)'s expert
        load, counts = load_and_counts(a_hat, self.num_experts, global_=self.training)
        return Routing(expert=a_hat, gate=gate, stats={"load": load, "distill_agree": agree}, counts=counts)
