"""Dense controls in the MoE slot: every token goes through one FFN stack, with no gate.

- `dense`: one expert's stack (--moe-sublayers × FFN), the FLOP-matched "Larger Transformer" of the paper's
  Table 3 (a routed MoE computes one expert per token too).
- `dense_deeper` / `dense_wider`: the parameter-matched "Larger Transformer (deeper/wider)" of Table 2: all N
  experts' parameters in one dense stack, N× more sublayers or an N× wider FFN (N = --moe-experts).
The layer then holds one "expert" whose parameters count as shared, not expert, parameters.
"""
import torch

from .base import RoutingDecision, RoutingStrategy, TokenView, Vocabulary


class DenseRouting(RoutingStrategy):
    dense = True

    @classmethod
    def expert_layout(cls, settings, ffn_dim: int):
        return 1, settings.moe_ffn_embed_dim or ffn_dim, settings.moe_sublayers

    @classmethod
    def build(cls, settings, dim: int, vocab: Vocabulary) -> "DenseRouting":
        return cls()

    def decide(self, h: torch.Tensor, tokens: TokenView) -> torch.Tensor:
        return h.new_zeros(h.size(0), dtype=torch.long)

    def forward(self, h: torch.Tensor, tokens: TokenView) -> RoutingDecision:
        return RoutingDecision(expert=self.decide(h, tokens), gate=None)


class DeeperDenseRouting(DenseRouting):
    @classmethod
    def expert_layout(cls, settings, ffn_dim):
        return 1, settings.moe_ffn_embed_dim or ffn_dim, settings.moe_experts * settings.moe_sublayers


class WiderDenseRouting(DenseRouting):
    @classmethod
    def expert_layout(cls, settings, ffn_dim):
        return 1, settings.moe_experts * (settings.moe_ffn_embed_dim or ffn_dim), settings.moe_sublayers
