"""The experts: each one a stack of pre-LN residual FFN sublayers (as fairseq's BASE layers).

Each parameter is one tensor (sublayer, local expert, ...): a sublayer's bank of a projection is (E, out, in),
experts leading, and one expert's matrix is a free view. expert_bank.py computes on it (one loop over the experts,
or one grouped GEMM per projection). Checkpoints keep one entry per expert, keyed by its global id.
"""
import functools
import logging
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules import LayerNorm

from .expert_bank import PARAMETERS, GradientMemory, grouped_mm_function, run_bank
from .expert_keys import CHECKPOINT_NAMES, ENTRY, expert_key

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "grouped", "loop")


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
    """One expert as modules: the dense control's FFN stack, and the initialisation of each stacked expert."""
    return nn.Sequential(*[ExpertSublayer(dim, ffn_dim, activation) for _ in range(sublayers)])


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs a grouped GEMM on this device type and dtype (tried once on a tiny product).

    torch 2.13 runs it on CPU in float32, bfloat16 and float16 (not float64), with the same results as one matmul
    per group; on CUDA its fast kernel is bfloat16's. Its rules, here and there: int32 offsets (each group's end)
    and row strides a multiple of 16 bytes (so d and the FFN size times the dtype's size: `grouped_runs` checks).
    """
    grouped_mm = grouped_mm_function()
    if grouped_mm is None:
        return False
    try:
        a = torch.ones(8, 8, dtype=dtype, device=device_type)
        out = grouped_mm(a, a.unsqueeze(0), offs=torch.tensor([8], dtype=torch.int32, device=device_type))
        return bool(out.float().eq(8).all())
    except (RuntimeError, NotImplementedError) as e:
        logger.info(f"grouped_mm does not run on {device_type} in {dtype} ({e}); the experts run in a loop")
        return False


class Experts(nn.Module):
    """The experts that live in this process, keyed by their *global* id.

    Keys are global ids so that a checkpoint names the same expert the same way at any world size:
    loading keeps this process's experts and skips the others'. With a `seed`, expert i is initialised
    from seed + i, so its weights do not depend on which process builds it (or how many there are).
    `impl`: "auto" (grouped GEMM on a GPU where it runs, else the loop), "grouped" or "loop".
    """

    def __init__(self, global_ids: Iterable[int], dim: int, ffn_dim: int, sublayers: int,
                 activation: str = "relu", seed: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        self.global_ids: List[int] = list(global_ids)
        self.dim, self.ffn_dim, self.sublayers = dim, ffn_dim, sublayers
        self.activation_fn = utils.get_activation_fn(activation)
        self.impl = impl
        built = []
        for i in self.global_ids:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed + i)
                built.append(build_expert(dim, ffn_dim, sublayers, activation).state_dict())
        for name in PARAMETERS:  # (sublayer, local expert, ...)
            key = CHECKPOINT_NAMES[name]  # its name in one expert module's state dict
            stacked = torch.stack([torch.stack([e[f"{s}.{key}"] for e in built]) for s in range(sublayers)])
            self.register_parameter(name, nn.Parameter(stacked))
        # the other ranks' experts, gathered here (rank 0) so that a checkpoint holds all of them
        self.gathered: Optional[Dict[str, torch.Tensor]] = None
        self.needs_gathered = False  # True on the rank that writes checkpoints under expert parallelism
        self.gradient_memory = GradientMemory()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str):
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"Experts.impl must be one of {IMPLEMENTATIONS}, not {value!r}")
        self._impl = value

    def __len__(self):
        return len(self.global_ids)

    @property
    def device(self) -> torch.device:
        return self.norm_weight.device

    def forward(self, x_sorted: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Run each expert on its contiguous slice of `x_sorted` (rows grouped by local expert).

        No padding: cost follows the real load.
        """
        params = tuple(getattr(self, name) for name in PARAMETERS)
        return run_bank(x_sorted, counts, params, self.activation_fn, self.compute_dtype(x_sorted),
                        grouped=self.uses_grouped(x_sorted), memory=self.gradient_memory)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The matrix multiplies' dtype: autocast's where it is on (as for nn.Linear), else the input's."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x.dtype

    def uses_grouped(self, x: torch.Tensor) -> bool:
        """auto: grouped on a GPU, where one call replaces hundreds of kernel launches; the loop on CPU, where it
        measured faster (benchmarks/README.md) and there are no launches to save."""
        if self.impl != "auto":
            return self.impl == "grouped"
        return x.device.type == "cuda" and self.grouped_runs(x)

    def grouped_runs(self, x: torch.Tensor) -> bool:
        """Whether a grouped GEMM takes these experts' products for input `x` (dtype, device, alignment)."""
        dtype = self.compute_dtype(x)
        aligned = all(size * dtype.itemsize % 16 == 0 for size in (self.dim, self.ffn_dim))  # its stride rule
        return aligned and grouped_mm_works(x.device.type, dtype)

    def expert_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert j on rows `x`, by autograd through fairseq's own ops (a reference for the bank)."""
        w = {name: getattr(self, name) for name in PARAMETERS}
        for s in range(self.sublayers):
            h = F.layer_norm(x, (self.dim,), w["norm_weight"][s, j], w["norm_bias"][s, j])
            h = self.activation_fn(F.linear(h, w["ff1_weight"][s, j], w["ff1_bias"][s, j]))
            x = x + F.linear(h, w["ff2_weight"][s, j], w["ff2_bias"][s, j])
        return x

    def expert(self, global_id: int):
        """Expert `global_id` (one of this process's) as a function of its rows."""
        return functools.partial(self.expert_forward, self.global_ids.index(int(global_id)))

    def per_expert(self, stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Stacked tensors (parameter name -> parameter, gradient, ...) as views keyed by expert_key, expert by
        expert in id order: the checkpoint's layout."""
        out = {}
        for j, expert_id in enumerate(self.global_ids):
            for s in range(self.sublayers):
                for name in PARAMETERS:
                    if stacked.get(name) is not None:
                        out[expert_key(expert_id, s, name)] = stacked[name][s, j]
        return out

    def expert_state(self) -> Dict[str, torch.Tensor]:
        return self.per_expert({name: p.detach() for name, p in self.named_parameters(recurse=False)})

    def expert_keys(self, global_ids: Iterable[int]) -> List[str]:
        """The keys of `global_ids`' experts (of any rank), in expert_state's order."""
        return [expert_key(i, s, name) for i in global_ids for s in range(self.sublayers) for name in PARAMETERS]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        params = dict(self.named_parameters(recurse=False))
        for key, value in self.per_expert(params if keep_vars else {n: p.detach() for n, p in params.items()}).items():
            destination[prefix + ENTRY + key] = value
        if self.needs_gathered and self.gathered is None:
            logger.warning(
                "this state dict holds only this rank's experts: the others are gathered when all ranks validate, "
                "and fairseq saved without validating first. Keep validation on before each save (no "
                "--disable-validation; --validate-interval must divide --save-interval)")
        for key, value in (self.gathered or {}).items():
            destination[prefix + ENTRY + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Each of this process's experts from its own entry; the other ranks' experts are skipped."""
        mine = self.per_expert(dict(self.named_parameters(recurse=False)))
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if not name.startswith(ENTRY):
                unexpected_keys.append(key)
                continue
            target = mine.pop(name[len(ENTRY):], None)
            if target is None:
                continue  # another rank's expert
            value = state_dict[key]
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(value)
        missing_keys.extend(prefix + ENTRY + key for key in mine)
