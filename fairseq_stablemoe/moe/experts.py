"""The experts: each one a stack of pre-LN residual FFN sublayers (as fairseq's BASE layers)."""
import logging
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.modules import LayerNorm

logger = logging.getLogger(__name__)


class ExpertSublayer(nn.Module):
    """x + W2·act(W1·LN(x)) + b2, with W2 and b2 zero-initialised so an untrained expert is the identity."""

    def __init__(self, dim: int, ffn_dim: int, activation: str = "relu"):
        super().__init__()
        self.activation_fn = utils.get_activation_fn(activation)
        self.norm = LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, dim)
        nn.init.zeros_(self.ff2.weight)
        nn.init.zeros_(self.ff2.bias)

    def forward(self, x):
        return x + self.ff2(self.activation_fn(self.ff1(self.norm(x))))


def build_expert(dim: int, ffn_dim: int, sublayers: int, activation: str = "relu") -> nn.Sequential:
    return nn.Sequential(*[ExpertSublayer(dim, ffn_dim, activation) for _ in range(sublayers)])


class Experts(nn.Module):
    """The experts that live in this process, keyed by their *global* id.

    Keys are global ids so that a checkpoint names the same expert the same way at any world size:
    loading keeps this process's experts and skips the others'. With a `seed`, expert i is initialised
    from seed + i, so its weights do not depend on which process builds it (or how many there are).
    """

    def __init__(self, global_ids: Iterable[int], dim: int, ffn_dim: int, sublayers: int,
                 activation: str = "relu", seed: Optional[int] = None):
        super().__init__()
        self.global_ids: List[int] = list(global_ids)
        experts = {}
        for i in self.global_ids:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed + i)
                experts[str(i)] = build_expert(dim, ffn_dim, sublayers, activation)
        self.experts = nn.ModuleDict(experts)
        # the other ranks' experts, gathered here (rank 0) so that a checkpoint holds all of them
        self.gathered: Optional[Dict[str, torch.Tensor]] = None
        self.needs_gathered = False  # True on the rank that writes checkpoints under expert parallelism

    def __len__(self):
        return len(self.global_ids)

    def forward(self, x_sorted: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Run each expert on its contiguous slice of `x_sorted` (rows grouped by local expert).

        One matrix multiply per non-empty expert, no padding: cost follows the real load.
        """
        outputs = []
        for expert_id, chunk in zip(self.global_ids, x_sorted.split(counts)):
            outputs.append(self.experts[str(expert_id)](chunk) if chunk.size(0) > 0 else chunk)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.needs_gathered and self.gathered is None:
            logger.warning(
                "this state dict holds only this rank's experts: the others are gathered when all ranks validate, "
                "and fairseq saved without validating first. Keep validation on before each save (no "
                "--disable-validation; --validate-interval must divide --save-interval)")
        for key, value in (self.gathered or {}).items():
            destination[prefix + "experts." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {str(i) for i in self.global_ids}
        for key in [k for k in state_dict if k.startswith(prefix + "experts.")]:
            if key[len(prefix + "experts."):].split(".", 1)[0] not in mine:
                del state_dict[key]  # another rank's expert
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
