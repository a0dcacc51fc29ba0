"""The experts: each one a stack of pre-LN residual FFN sublayers (as fairseq's BASE layers).

The experts' weights are stacked (sublayer, local expert, ...), so that one grouped matrix multiply
(`torch._grouped_mm`) per projection runs every expert on its rows: a handful of kernels per layer instead of
3 per sublayer per expert. Where grouped_mm is missing or refuses the dtype/device, a loop over the experts
runs on the same stacked weights. Checkpoints keep one entry per expert, keyed by its global id.
"""
import functools
import logging
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules import LayerNorm

logger = logging.getLogger(__name__)

# stacked parameter -> its name inside one expert's sublayer in a checkpoint (fairseq BASE-layer style)
CHECKPOINT_NAMES = {"norm_weight": "norm.weight", "norm_bias": "norm.bias", "ff1_weight": "ff1.weight",
                    "ff1_bias": "ff1.bias", "ff2_weight": "ff2.weight", "ff2_bias": "ff2.bias"}
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
    """Whether this torch runs `_grouped_mm` on this device type and dtype (tried once on a tiny product).

    torch 2.13 runs it on CPU in float32, bfloat16 and float16 (not float64), with the same results as one matmul
    per group; on CUDA its fast kernel is bfloat16's. Its rules, here and there: int32 offsets (each group's end),
    row strides a multiple of 16 bytes (so d and the FFN size times the dtype's size: `grouped_runs` checks), no
    bias, and a backward that refuses a broadcast (stride-0) gradient (`grouped_linear` makes it contiguous).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(8, 8, dtype=dtype, device=device_type)
        out = torch._grouped_mm(a, a.unsqueeze(0), offs=torch.tensor([8], dtype=torch.int32, device=device_type))
        return bool(out.float().eq(8).all())
    except (RuntimeError, NotImplementedError) as e:
        logger.info(f"torch._grouped_mm does not run on {device_type} in {dtype} ({e}); the experts run in a loop")
        return False


def _contiguous(grad):
    return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[i-1]:offs[i] of `x` times weight[i]ᵀ (weight: experts × out × in, nn.Linear's layout)."""
    out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    if out.requires_grad:
        out.register_hook(_contiguous)  # its backward takes no broadcast (stride-0) gradient, e.g. of a .sum()
    return out


class GatherRows(torch.autograd.Function):
    """table[rows] (each row's expert's bias or norm weight), whose backward sums the gradient of each expert's
    rows by a matrix product with their one-hot matrix: accumulated in float32 and deterministic, where indexing's
    backward (index_add) accumulates in the gradient's dtype, which in bfloat16 loses most of a bias gradient."""

    @staticmethod
    def forward(ctx, table, rows, one_hot):
        ctx.save_for_backward(one_hot)
        return table[rows]

    @staticmethod
    def backward(ctx, grad):
        (one_hot,) = ctx.saved_tensors
        return one_hot.t().to(grad.dtype).mm(grad), None, None


class Experts(nn.Module):
    """The experts that live in this process, keyed by their *global* id.

    Keys are global ids so that a checkpoint names the same expert the same way at any world size:
    loading keeps this process's experts and skips the others'. With a `seed`, expert i is initialised
    from seed + i, so its weights do not depend on which process builds it (or how many there are).
    `impl`: "auto" (grouped on a GPU where it runs, else the loop), "grouped" or "loop".
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
        for name, key in CHECKPOINT_NAMES.items():  # (sublayer, local expert, ...)
            stacked = torch.stack([torch.stack([e[f"{s}.{key}"] for e in built]) for s in range(sublayers)])
            self.register_parameter(name, nn.Parameter(stacked))
        # the other ranks' experts, gathered here (rank 0) so that a checkpoint holds all of them
        self.gathered: Optional[Dict[str, torch.Tensor]] = None
        self.needs_gathered = False  # True on the rank that writes checkpoints under expert parallelism

    def __len__(self):
        return len(self.global_ids)

    def forward(self, x_sorted: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Run each expert on its contiguous slice of `x_sorted` (rows grouped by local expert).

        No padding: cost follows the real load.
        """
        if self.uses_grouped(x_sorted):
            return self._grouped(x_sorted, counts)
        return self._loop(x_sorted, counts)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The matrix multiplies' dtype: autocast's where it is on (as for nn.Linear), else the input's."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x.dtype

    def uses_grouped(self, x: torch.Tensor) -> bool:
        """auto: grouped on a GPU, where one call replaces hundreds of kernel launches; the loop on CPU, where it
        measured faster (benchmarks/README.md) and there are no launches to save."""
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"Experts.impl must be one of {IMPLEMENTATIONS}, not {self.impl!r}")
        if self.impl != "auto":
            return self.impl == "grouped"
        return x.device.type == "cuda" and self.grouped_runs(x)

    def grouped_runs(self, x: torch.Tensor) -> bool:
        """Whether torch._grouped_mm takes these experts' products for input `x` (dtype, device, alignment)."""
        dtype = self.compute_dtype(x)
        aligned = all(size * dtype.itemsize % 16 == 0 for size in (self.dim, self.ffn_dim))  # its stride rule
        return aligned and grouped_mm_works(x.device.type, dtype)

    def _grouped(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        if x.size(0) == 0:
            return x
        device, dtype = x.device, self.compute_dtype(x)
        sizes = torch.tensor(counts, device=device)
        offs = sizes.cumsum(0).to(torch.int32)
        rows = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes, output_size=x.size(0))
        one_hot = F.one_hot(rows, len(counts)).to(dtype)  # n x experts, kept for the backward

        def per_row(table):
            return GatherRows.apply(table, rows, one_hot)

        w = self._unbound()
        for s in range(self.sublayers):
            h = F.layer_norm(x, (self.dim,))
            h = torch.addcmul(per_row(w["norm_bias"][s]), h, per_row(w["norm_weight"][s]))
            h = grouped_linear(h.to(dtype), w["ff1_weight"][s].to(dtype), offs)
            h = self.activation_fn(h + per_row(w["ff1_bias"][s].to(dtype)))
            x = x + (grouped_linear(h, w["ff2_weight"][s].to(dtype), offs) + per_row(w["ff2_bias"][s].to(dtype)))
        return x

    def _unbound(self, per_expert: bool = False) -> Dict[str, list]:
        """Each stacked parameter as its sublayers' (experts × ...) views, or [sublayer][expert] views: views made
        by unbind, whose backward writes the parameter's gradient once; indexing (p[s], p[s, j]) would allocate a
        parameter-sized gradient for every index in the backward."""
        w = {name: p.unbind(0) for name, p in self.named_parameters(recurse=False)}
        return {name: [t.unbind(0) for t in ts] for name, ts in w.items()} if per_expert else w

    def _loop(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """One nn.Linear-style multiply per projection per non-empty expert."""
        w = self._unbound(per_expert=True)
        outputs = [self.expert_forward(j, chunk, w) if chunk.size(0) > 0 else chunk
                   for j, chunk in enumerate(x.split(counts))]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def expert_forward(self, j: int, x: torch.Tensor, w: Optional[Dict[str, list]] = None) -> torch.Tensor:
        """Local expert j on rows `x` (`w`: the parameters as `_unbound(per_expert=True)` gives them)."""
        w = w or self._unbound(per_expert=True)
        for s in range(self.sublayers):
            h = F.layer_norm(x, (self.dim,), w["norm_weight"][s][j], w["norm_bias"][s][j])
            h = self.activation_fn(F.linear(h, w["ff1_weight"][s][j], w["ff1_bias"][s][j]))
            x = x + F.linear(h, w["ff2_weight"][s][j], w["ff2_bias"][s][j])
        return x

    def expert(self, global_id: int):
        """Expert `global_id` (one of this process's) as a function of its rows."""
        return functools.partial(self.expert_forward, self.global_ids.index(int(global_id)))

    def per_expert(self, stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Stacked tensors (parameter name -> parameter, gradient, ...) as "<global id>.<sublayer>.<name>"
        views, expert by expert in id order: the checkpoint's layout."""
        out = {}
        for j, expert_id in enumerate(self.global_ids):
            for s in range(self.sublayers):
                for name, key in CHECKPOINT_NAMES.items():
                    if stacked.get(name) is not None:
                        out[f"{expert_id}.{s}.{key}"] = stacked[name][s, j]
        return out

    def expert_state(self) -> Dict[str, torch.Tensor]:
        return self.per_expert({name: p.detach() for name, p in self.named_parameters(recurse=False)})

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        params = dict(self.named_parameters(recurse=False))
        for key, value in self.per_expert(params if keep_vars else {n: p.detach() for n, p in params.items()}).items():
            destination[prefix + "experts." + key] = value
        if self.needs_gathered and self.gathered is None:
            logger.warning(
                "this state dict holds only this rank's experts: the others are gathered when all ranks validate, "
                "and fairseq saved without validating first. Keep validation on before each save (no "
                "--disable-validation; --validate-interval must divide --save-interval)")
        for key, value in (self.gathered or {}).items():
            destination[prefix + "experts." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Each of this process's experts from its own entry; the other ranks' experts are skipped."""
        mine = self.per_expert(dict(self.named_parameters(recurse=False)))
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if not name.startswith("experts."):
                unexpected_keys.append(key)
                continue
            target = mine.pop(name[len("experts."):], None)
            if target is None:
                continue  # another rank's expert
            value = state_dict[key]
            if value.shape != target.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(value)
        missing_keys.extend(prefix + "experts." + key for key in mine)
