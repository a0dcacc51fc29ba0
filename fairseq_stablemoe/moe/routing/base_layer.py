"""BASE layers routing (Lewis et al., 2021), a baseline of the paper's Table 1.

Training assigns tokens to experts by a balanced linear assignment on s_{t,i} = E_iᵀ h_t (fairseq's C++
auction, `fairseq.libbase`), so every expert gets the same number of tokens and no balance loss is needed;
inference is greedy top-1. The gate is σ(s_{t,a_t}), as in StableMoE.

With several data-parallel ranks each rank balances its own batch (all experts are visible to every rank's
assignment), so the whole batch is balanced too.
"""
import torch

from .base import CentroidRouting, RoutingDecision, TokenView, affinities, expert_load

_libbase = None


def _auction():
    global _libbase
    if _libbase is None:
        try:
            from fairseq import libbase
        except ImportError as e:
            raise ImportError(
                "--moe-routing base (and --stage1-assignment balanced) needs fairseq's C++ extension "
                "fairseq.libbase for the balanced assignment; build it from fairseq's source tree with "
                "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .` there), against "
                "the torch you train with") from e
        _libbase = libbase
    return _libbase


@torch.no_grad()
def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """The expert of each of the n rows of `scores` (n x N) maximising Σ_t s_{t,a_t} with every expert
    taking ⌊n/N⌋ or ⌈n/N⌉ tokens (exactly n/N when N divides n)."""
    n, num_experts = scores.shape
    if n == 0:
        return scores.new_zeros(0, dtype=torch.long)
    scores = scores.detach().float()
    finite = scores.isfinite()
    if not finite.all():  # NaN/inf stop the auction from converging
        scores = scores.where(finite, scores[finite].min() if finite.any() else scores.new_zeros(()))
    filler = -n % num_experts
    if filler:  # the auction needs N | n: filler rows, one for each of the least wanted experts, take the slack
        lo, hi = scores.min(), scores.max()
        wanted = torch.bincount(scores.argmax(-1), minlength=num_experts)
        rows = lo.expand(filler, num_experts).clone()
        rows[torch.arange(filler), wanted.argsort(stable=True)[:filler]] = hi + (hi - lo) + 1
        scores = torch.cat([scores, rows])
    per_expert = scores.size(0) // num_experts
    rows = _auction().balanced_assignment(scores)  # expert i's rows at [i·per_expert, (i+1)·per_expert)
    expert = torch.empty(scores.size(0), dtype=torch.long, device=scores.device)
    expert[rows] = torch.arange(num_experts, device=scores.device).repeat_interleave(per_expert)
    return expert[:n]


class BASERouting(CentroidRouting):
    @torch.no_grad()
    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        return balanced_assignment(affinities(h, self.centroids))

    def forward(self, h: torch.Tensor, tokens: TokenView) -> RoutingDecision:
        s = affinities(h, self.centroids)
        expert = balanced_assignment(s) if self.training else s.detach().argmax(-1)
        gate = torch.sigmoid(s.gather(1, expert[:, None]).squeeze(1))
        load = expert_load(expert, self.num_experts, global_=self.training)
        return RoutingDecision(expert=expert, gate=gate, stats={"load": load})
