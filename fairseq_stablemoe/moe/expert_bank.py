"""The experts' arithmetic: S pre-LN residual FFN sublayers, each expert on its own contiguous rows.

    x_{s+1} = x_s + W2_e · act(W1_e · (x̂_s ⊙ γ_e + β_e) + b1_e) + b2_e,   x̂_s = LayerNorm(x_s) without affine

for the rows of expert e, with each parameter stored (sublayer, expert, ...): a sublayer's bank of one
projection is one (E, out, in) tensor, experts leading, and one expert's matrix a free view of it.

`ExpertBank` is one autograd Function over the whole bank. Its backward writes each expert's weight gradient
straight into that expert's slice of one gradient tensor per parameter (`torch.mm(..., out=...)`): no per-expert
gradients stacked by autograd (an `unbind` of the parameters gathers every gradient once more, twice when
nested). It saves what autograd would for one module per expert (each sublayer's input, LayerNorm output and
activation) and releases each expert's as soon as its backward has used them. Temporaries are overwritten where
autograd would allocate (ReLU, its backward, the residual sums): on CPU each buffer avoided is memory traffic, and
for an expert whose rows pass glibc's 32 MB mmap threshold, a fresh mapping and its page faults.

Two classes supply the products and the LayerNorm: `LoopProducts` takes one expert at a time through all its
sublayers (CPU, where it is the fastest: its rows stay in cache between a product and the next elementwise op),
`GroupedProducts` all experts at once, one grouped GEMM per projection. The sublayer itself (`sublayer`,
`sublayer_backward`: biases, activation, residual, and the order of the gradients) is written once, for both.
"""
import itertools
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

EPS = 1e-5  # fairseq's LayerNorm
PARAMETERS = ("norm_weight", "norm_bias", "ff1_weight", "ff1_bias", "ff2_weight", "ff2_bias")


def grouped_mm_function():
    """The public torch.nn.functional.grouped_mm where this torch has it, else the private torch._grouped_mm."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class LoopProducts:
    """One expert at a time, all its sublayers on its rows, with fairseq's fused LayerNorm on its weights."""

    def __init__(self, counts: Sequence[int]):
        ends = list(itertools.accumulate(counts))  # host ints: no tensor round trip per forward
        self.segments = [(j, end - n, end) for j, (n, end) in enumerate(zip(counts, ends)) if n > 0]
        self.empty = [j for j, n in enumerate(counts) if n == 0]

    @staticmethod
    def select(param, s, j):
        return param[s, j]

    @staticmethod
    def linear(x, weight, bias):
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def input_grad(grad, weight):
        return grad.mm(weight)

    @staticmethod
    def weight_grad(grad, x, out):
        if out is None:
            return
        if out.dtype == grad.dtype:
            torch.mm(grad.t(), x, out=out)
        else:
            out.copy_(grad.t().mm(x))

    @staticmethod
    def row_sums(t, out):
        if out is not None:
            torch.sum(t, 0, dtype=out.dtype, out=out)

    @staticmethod
    def norm(x, weight, bias):
        """(LayerNorm(x) with this expert's affine, what its backward needs): fairseq's fused kernel."""
        ln, mean, rstd = torch.native_layer_norm(x, (x.size(1),), weight, bias, EPS)
        return ln, (x, ln, mean, rstd)

    @staticmethod
    def norm_output(saved, weight, bias):
        return saved[1]

    @staticmethod
    def norm_backward(grad, saved, weight, bias, g_weight, g_bias):
        x, _, mean, rstd = saved
        g_x, g_w, g_b = torch.ops.aten.native_layer_norm_backward(
            grad, x, (x.size(1),), mean, rstd, weight, bias, [True, g_weight is not None, g_bias is not None])
        for out, g in ((g_weight, g_w), (g_bias, g_b)):
            if out is not None:
                out.copy_(g)
        return g_x


class GroupedProducts:
    """All experts at once: one grouped GEMM per projection (offsets: each expert's last row + 1); per-expert
    vectors reach their rows by a one-hot product, which also sums the rows' gradients (in float32,
    deterministically)."""

    def __init__(self, counts: Sequence[int], device, dtype):
        sizes = torch.tensor(list(counts), device=device)
        self.offs = sizes.cumsum(0).to(torch.int32)
        rows = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes, output_size=int(sum(counts)))
        self.one_hot = F.one_hot(rows, len(counts)).to(dtype)  # n x experts
        self.segments, self.empty = [(None, 0, int(sum(counts)))], []
        self.mm = grouped_mm_function()

    @staticmethod
    def select(param, s, j):
        return param[s]

    def per_row(self, table):
        return self.one_hot.to(table.dtype).mm(table)

    def linear(self, x, weight, bias):
        return self.mm(x, weight.transpose(-2, -1), offs=self.offs) + self.per_row(bias)

    def input_grad(self, grad, weight):
        return self.mm(grad, weight, offs=self.offs)

    def weight_grad(self, grad, x, out):
        if out is not None:
            out.copy_(self.mm(grad.t(), x, offs=self.offs))  # column-major grad: its strides stay aligned

    def row_sums(self, t, out):
        if out is None:
            return
        wide = torch.promote_types(t.dtype, torch.float32)
        out.copy_(self.one_hot.t().to(wide).mm(t.to(wide)))

    def norm(self, x, weight, bias):
        """LayerNorm without affine, then each row's expert's affine (no fused kernel takes per-row weights)."""
        x_hat, mean, rstd = torch.native_layer_norm(x, (x.size(1),), None, None, EPS)
        return self.norm_output((x, x_hat, mean, rstd), weight, bias), (x, x_hat, mean, rstd)

    def norm_output(self, saved, weight, bias):
        return torch.addcmul(self.per_row(bias), saved[1], self.per_row(weight))

    def norm_backward(self, grad, saved, weight, bias, g_weight, g_bias):
        x, x_hat, mean, rstd = saved
        self.row_sums(grad * x_hat, g_weight)
        self.row_sums(grad, g_bias)
        return torch.ops.aten.native_layer_norm_backward(grad * self.per_row(weight), x, (x.size(1),), mean, rstd,
                                                         None, None, [True, False, False])[0]


def activate(activation, a):
    """act(a); ReLU in place: `a` is a temporary, and a second n×4d buffer would be fresh memory (and page faults)
    for every expert whose rows pass glibc's mmap threshold."""
    return F.relu_(a) if activation is F.relu else activation(a)


def activation_grad(activation, grad, saved):
    """d act / d a · grad (overwriting `grad`, a temporary, for ReLU), from what forward saved: ReLU's output (its
    mask), else its input (recomputed)."""
    if activation is F.relu:
        return torch.ops.aten.threshold_backward.grad_input(grad, saved, 0, grad_input=grad)
    with torch.enable_grad():
        a = saved.detach().requires_grad_()
        return torch.autograd.grad(activation(a), a, grad)[0]


def residual(x, branch):
    """x + branch, written into `branch` (a temporary) where it has x's dtype: one n×d buffer fewer per sublayer.
    Addition commutes exactly, so the sum is the same bits either way."""
    return branch.add_(x) if branch.dtype == x.dtype else x + branch


def sublayer(ops, x, p, activation, dtype):
    """One sublayer on one segment's rows (`p`: its parameters, as ops.select gives them): (output, saved)."""
    norm_w, norm_b, w1, b1, w2, b2 = p
    ln, norm_saved = ops.norm(x, norm_w, norm_b)
    a = ops.linear(ln.to(dtype), w1.to(dtype), b1.to(dtype))
    h = activate(activation, a)  # for ReLU, `a` itself: what its backward needs (the mask) either way
    return residual(x, ops.linear(h, w2.to(dtype), b2.to(dtype))), (norm_saved, a)


def sublayer_backward(ops, grad, saved, p, g_p, activation, dtype):
    """The gradient of one sublayer's input from its output's, writing its parameters' gradients into g_p."""
    norm_w, norm_b, w1, b1, w2, b2 = p
    g_norm_w, g_norm_b, g_w1, g_b1, g_w2, g_b2 = g_p
    norm_saved, kept = saved
    h = kept if activation is F.relu else activation(kept)
    g = grad.to(dtype).contiguous()  # grouped GEMMs refuse a broadcast (stride-0) gradient
    ops.weight_grad(g, h, g_w2)
    ops.row_sums(g, g_b2)
    g_a = activation_grad(activation, ops.input_grad(g, w2.to(dtype)), kept)
    del g, h, kept
    ops.weight_grad(g_a, ops.norm_output(norm_saved, norm_w, norm_b).to(dtype), g_w1)
    ops.row_sums(g_a, g_b1)
    g_ln = ops.input_grad(g_a, w1.to(dtype)).to(grad.dtype)
    del g_a
    return residual(grad, ops.norm_backward(g_ln, norm_saved, norm_w, norm_b, g_norm_w, g_norm_b))


class GradientMemory:
    """Where the bank's backward writes each parameter's gradient on CPU: the memory of the previous step's
    gradient when nobody holds it any more (fairseq sets .grad to None after each update), else fresh memory.

    glibc serves a tensor over 32 MB by a fresh mmap every time, and faulting its pages in costs more than writing
    them (benchmarks/memory.py), which one module per expert (small gradients, recycled by malloc) never paid.
    Reuse is safe: a gradient still referenced by anything (the
    parameter's .grad while gradients accumulate, a user's variable) keeps its storage's use count up, and then
    fresh memory is taken. The memory stays held between steps, as malloc holds the freed per-expert gradients.
    """

    def __init__(self):
        self.kept = {}  # parameter index -> (tensor, its storage's use count when only `kept` holds it)

    @staticmethod
    def _use_count(t):
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def take(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":  # CUDA's caching allocator already reuses freed blocks without faults
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        kept = self.kept.get(index)
        if kept is not None and kept[0].shape == like.shape and kept[0].dtype == like.dtype and \
                kept[0].device == like.device and self._use_count(kept[0]) <= kept[1]:
            return kept[0].view(like.shape)  # a new tensor on the same memory: autograd hands it to .grad
        fresh = torch.empty_like(like, memory_format=torch.contiguous_format)
        if hasattr(torch._C, "_storage_Use_Count"):
            self.kept[index] = (fresh, self._use_count(fresh))
        return fresh.view(like.shape)

    def __deepcopy__(self, memo):
        return GradientMemory()


def bank_forward(x, ops, activation, dtype, params, keep: bool):
    """Each segment's rows through its sublayers: (output, {segment: [saved per sublayer]} if `keep`)."""
    out, saved = torch.empty_like(x), {}
    for j, a, b in ops.segments:
        y, kept = x[a:b], []
        for s in range(params[0].size(0)):
            y, sublayer_saved = sublayer(ops, y, [ops.select(p, s, j) for p in params], activation, dtype)
            if keep:
                kept.append(sublayer_saved)
        out[a:b], saved[j] = y, kept
    return out, saved


class ExpertBank(torch.autograd.Function):
    """(x sorted by expert, products, activation, matrix dtype, gradient memory, *PARAMETERS) -> the experts'
    outputs. Each segment's saved tensors are released as soon as the backward has used them."""

    @staticmethod
    def forward(ctx, x, ops, activation, dtype, memory, *params):
        ctx.save_for_backward(*params)
        out, ctx.saved = bank_forward(x, ops, activation, dtype, params, keep=True)
        ctx.ops, ctx.activation, ctx.dtype, ctx.memory = ops, activation, dtype, memory
        return out

    @staticmethod
    def backward(ctx, grad):
        ops, params, needs = ctx.ops, ctx.saved_tensors, ctx.needs_input_grad[5:]
        grads = [ctx.memory.take(i, p) if need else None for i, (p, need) in enumerate(zip(params, needs))]
        grad_in = torch.empty_like(grad)
        for j, a, b in ops.segments:
            g = grad[a:b]
            for s in reversed(range(params[0].size(0))):
                g = sublayer_backward(ops, g, ctx.saved[j].pop(), [ops.select(p, s, j) for p in params],
                                      [g if g is None else ops.select(g, s, j) for g in grads], ctx.activation,
                                      ctx.dtype)
            grad_in[a:b] = g
            del ctx.saved[j]
        for g in grads:
            if g is not None and ops.empty:
                g[:, ops.empty] = 0  # an expert without rows: its gradient is 0
        return (grad_in, None, None, None, None, *grads)


def run_bank(x: torch.Tensor, counts: List[int], params: Tuple[torch.Tensor, ...], activation, dtype,
             grouped: bool, memory: GradientMemory) -> torch.Tensor:
    """The experts on x's rows (grouped by expert, `counts` each), matrix products in `dtype`."""
    if x.size(0) == 0:
        return x
    products = GroupedProducts(counts, x.device, dtype) if grouped else LoopProducts(counts)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit: autocast's rules, applied by hand
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return ExpertBank.apply(x, products, activation, dtype, memory, *params)
        with torch.no_grad():  # inference: nothing saved, each sublayer's activations freed as it goes
            return bank_forward(x, products, activation, dtype, params, keep=False)[0]
