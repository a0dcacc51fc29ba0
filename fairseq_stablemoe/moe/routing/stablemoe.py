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

Ablation beyond the paper, --stage2-gate one: stage 2 (and inference) computes h'_t = h_t + FFN_{â_t}(h_t), with
no gate; stage 1 keeps (7), whose σ the balance loss (8) needs.
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..distilled_router import DistilledRouter, build_distilled_router
from .base import (CentroidRouting, RoutingDecision, TokenView, Vocabulary, affinities, chosen_affinity,
                   load_and_counts)
from .base_layer import balanced_assignment


def balance_loss(load: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Eq. 8 without α: the load term is a constant, so only σ(s_{t,a_t}) of tokens in A_i get a gradient."""
    load = load.to(gate.dtype)
    n_bar = load.sum() / load.numel()
    overload = (load - n_bar) / n_bar.clamp(min=1e-9)  # an empty batch has load 0 everywhere
    return (overload[expert] * gate).sum()


@dataclass(frozen=True)
class Stage1Schedule:
    """When stage 1 ends: at a fixed update count (`updates`), or, `auto`, when the task calls end_stage1
    (tasks/stage1_auto.py). One field, so the two cannot disagree."""

    updates: Optional[int]  # None exactly when auto: ask `auto`

    @property
    def auto(self) -> bool:
        return self.updates is None

    def ends_by(self, num_updates: int) -> bool:
        """Whether a fixed schedule puts update `num_updates` in stage 2 (auto never decides by the count)."""
        return not self.auto and num_updates >= self.updates

    def __str__(self):
        return "auto" if self.auto else str(self.updates)


AUTO = Stage1Schedule(None)


def stage1_schedule(value) -> Stage1Schedule:
    """--stage1-updates as the routing takes it: a number of updates, or auto (the task ends stage 1)."""
    if isinstance(value, Stage1Schedule):
        return value
    text = str(value).strip()
    if text == "auto":
        return AUTO
    if not text.lstrip("-").isdigit() or int(text) < 0:
        raise ValueError(f"--stage1-updates must be a number of updates >= 0 or auto (got {value}); the paper uses "
                         f"10% of --max-update")
    return Stage1Schedule(int(text))


# what torch names a module's get_extra_state() in its state dict
EXTRA_STATE = "_extra_state"


class StableMoERouting(CentroidRouting):
    """The stage is this routing's own: decided from the update count fairseq passes to every module
    (`set_num_updates`, before each training step and when a checkpoint is loaded), and held as one number, the
    update stage 2 began at (`stage2_began`, None in stage 1), saved with the model as its extra state."""

    loss_names = ("balance", "distill")
    staged = True
    vocab_tables = {"distilled_router.embed.weight": "distilled router"}

    def __init__(self, dim: int, num_experts: int, distilled_router: DistilledRouter,
                 stage1_updates: Union[Stage1Schedule, int, str], stage1_assignment: str = "greedy",
                 stage2_gate: str = "sigmoid"):
        super().__init__(dim, num_experts)  # E
        self.stage2_gated = stage2_gate == "sigmoid"
        self.stage1_schedule = stage1_schedule(stage1_updates)  # auto: stage 1 ends only when end_stage1 is called
        self.balanced_stage1 = stage1_assignment == "balanced"
        self.distilled_router = distilled_router
        self.stage2_began: Optional[int] = None  # a host int: no forward reads the device for the stage

    @classmethod
    def build(cls, settings, dim: int, vocab: Vocabulary) -> "StableMoERouting":
        router = build_distilled_router(settings, vocab.size, vocab.padding_idx)
        return cls(dim, settings.moe_experts, router, settings.stage1_updates, settings.stage1_assignment,
                   settings.stage2_gate)

    def set_num_updates(self, num_updates: int):
        """fairseq's update count: stage 1 ends once `num_updates` updates are done (--stage1-updates)."""
        if not self.in_stage2 and self.stage1_schedule.ends_by(num_updates):
            self.end_stage1(num_updates)

    def end_stage1(self, num_updates: int):
        """Stage 2 from now on: the distilled router alone routes (by its token -> expert table where it has one).

        Its parameters stop requiring a gradient at the next training forward, not here: fairseq calls
        set_num_updates when it loads a checkpoint, before it rebuilds the optimizer and loads its state, and the
        optimizer must hold the same parameters as when the checkpoint was written."""
        self.distilled_router.fix_routing()
        self.stage2_began = num_updates

    def get_extra_state(self) -> dict:
        return {"stage2_began": self.stage2_began}  # plain types: torch.load(weights_only=True) reads them

    def set_extra_state(self, state: dict):
        began = state.get("stage2_began", state) if isinstance(state, dict) else state  # damaged: refused below
        if began is not None and (isinstance(began, bool) or not isinstance(began, int) or began < 0):
            raise ValueError(f"a StableMoE routing's saved stage2_began must be an update count >= 0 or None "
                             f"(got {began!r}): the checkpoint was changed or damaged")
        self.stage2_began = began

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the stage was one number hold buffers `stage` (1/2) and, from 2026-12-02,
        `stage2_start` (the update, -1 before): both become the extra state (a stage-2 checkpoint without
        `stage2_start` began stage 2 at --stage1-updates; auto: unknown, 0)."""
        stage, start = state_dict.pop(prefix + "stage", None), state_dict.pop(prefix + "stage2_start", None)
        if stage is not None and prefix + EXTRA_STATE not in state_dict:
            if int(stage) != 2:
                began = None
            elif start is not None:
                began = int(start)
            else:
                began = 0 if self.stage1_schedule.auto else self.stage1_schedule.updates
            state_dict[prefix + EXTRA_STATE] = {"stage2_began": began}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        """The expert each token would go to in training now, with no side effect (for routing probes)."""
        if self.in_stage2:
            return tokens.select(self.distilled_router.route(tokens.tokens, tokens.last, fixed=True))
        return self.stage1_assignment(affinities(h, self.centroids))

    def stage1_assignment(self, s: torch.Tensor) -> torch.Tensor:
        return balanced_assignment(s) if self.balanced_stage1 else s.detach().argmax(-1)  # (6)

    def forward(self, h: torch.Tensor, tokens: TokenView) -> RoutingDecision:
        if self.training and not self.in_stage2:
            s = affinities(h, self.centroids)  # (5), differentiable only through the gate below
            a = self.stage1_assignment(s)  # (6)
            gate = torch.sigmoid(s.gather(1, a[:, None]).squeeze(1))  # (7)
            load, counts = load_and_counts(a, self.num_experts, global_=True)
            losses = {} if self.balanced_stage1 else {"balance": balance_loss(load, a, gate)}  # (8)
            s_hat = tokens.select(self.distilled_router(tokens.tokens, tokens.last))  # (9)
            losses["distill"] = F.cross_entropy(s_hat, a, reduction="sum")  # (10)
            return RoutingDecision(
                expert=a,
                gate=gate,
                losses=losses,
                stats={"load": load, "distill_agree": (s_hat.detach().argmax(-1) == a).sum()},
                counts=counts,
            )
        if self.training and not self.distilled_router.frozen:
            # no gradient, so no optimizer (momentum included) moves it; the optimizer already holds it
            self.distilled_router.freeze()
        # (12, 13); in stage 2 the routing fixed at its start (the table), in stage 1 (validation) as it is now
        a_hat = tokens.select(self.distilled_router.route(tokens.tokens, tokens.last, fixed=self.in_stage2))
        if self.stage2_gated:
            # (14) differentiates s_{t,â_t} only; s (5) comes without autograd, for the logged agreement
            s_chosen, s = chosen_affinity(h, self.centroids, a_hat)
            gate = torch.sigmoid(s_chosen)  # (14)
        else:  # --stage2-gate one
            with torch.no_grad():
                s, gate = affinities(h, self.centroids), None
        agree = (a_hat == s.argmax(-1)).sum()  # logged: how often the frozen router still picks (6)'s expert
        load, counts = load_and_counts(a_hat, self.num_experts, global_=self.training)
        return RoutingDecision(expert=a_hat, gate=gate, stats={"load": load, "distill_agree": agree},
                               counts=counts)
