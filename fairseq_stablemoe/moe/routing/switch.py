"""Switch Transformer routing (Fedus et al., 2021), a baseline of the paper's Table 1.

    s_{t,i} = E_iᵀ h_t,  p_t = softmax(s_t),  a_t = argmax_i s_{t,i}       greedy top-1
    h'_t    = h_t + p_{t,a_t} · FFN_{a_t}(h_t)                               softmax gate
    L_switch = N · Σ_i f_i · P_i                                             (weighted by --switch-loss-factor)
f_i is the fraction of the batch's tokens sent to expert i, P_i the batch's mean router probability for i.
Capacity (--capacity-factor) is the layer's job.
"""
import torch

from .base import CentroidRouting, RoutingDecision, TokenView, affinities, expert_load


def switch_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """N · Σ_i f_i · Σ_t p_{t,i}: a token sum, so the criterion's division by the batch's token count makes
    it N · Σ_i f_i · P_i. `load` is the whole batch's (all ranks'); each rank sums its own p_{t,i}, and
    fairseq sums the ranks' gradients, so P_i is the whole batch's mean too. f_i is a count: no gradient."""
    f = load.to(probs.dtype) / load.sum().clamp(min=1)
    return probs.size(1) * (probs.sum(0) * f).sum()


class SwitchRouting(CentroidRouting):
    loss_names = ("switch",)  # what it may put in Routing.losses

    @torch.no_grad()
    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        return affinities(h, self.centroids).argmax(-1)

    def forward(self, h: torch.Tensor, tokens: TokenView) -> RoutingDecision:
        probs = affinities(h, self.centroids).softmax(-1)
        expert = probs.detach().argmax(-1)
        gate = probs.gather(1, expert[:, None]).squeeze(1)
        load = expert_load(expert, self.num_experts, global_=self.training)
        losses = {"switch": switch_loss(probs, load)} if self.training else {}
        return RoutingDecision(expert=expert, gate=gate, losses=losses, stats={"load": load})
