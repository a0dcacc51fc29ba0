"""MoE layer forward+backward time against the FLOP-matched dense FFN and against the floor.

    python benchmarks/layer.py --quick
    python benchmarks/layer.py --experts 8 32 --tokens 8192 --dims 512 --pairs 9
    python benchmarks/layer.py --experts 32 --tokens 8192 --dims 512 --experts-impl grouped loop

dense: one expert's stack (same d, FFN size and sublayers) on every token: the model the MoE layer replaces.
floor: the N experts on their tokens already grouped by expert: no routing, gather, gate or scatter.
experts: how the layer and the floor run the experts: one torch._grouped_mm per projection for all of them
(grouped), or one multiply per expert (loop); the same weights either way.
Every figure is the median over interleaved rounds (layer, dense, floor and the other stage run back to back
in a shuffled order each round) of per-round ratios, so load from other processes cancels out.
Prints tables; passes no judgement.
"""
import os
import random
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (ModuleExperts, build_dense, build_layer, common_args, forced_inputs,  # noqa: E402
                               print_table_header, split_by_expert)


class Timer:
    """Device time between CUDA events on a GPU; on CPU the process's CPU time (or wall time).

    CPU time does not count the time other processes hold the cores, which on a shared machine is most of the
    noise of wall time; with one thread it is the work done.
    """

    def __init__(self, device, clock="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = self.clock()
        fn()
        return self.clock() - t


def step(module, inputs, grads):
    """One forward and backward; gradients start from None as after optimizer.zero_grad()."""
    module.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None
    outputs = module(*inputs)
    torch.autograd.backward(outputs, grads)


class Floor(torch.nn.Module):
    """The experts alone, on rows already grouped by expert."""

    def __init__(self, experts, counts):
        super().__init__()
        self.experts, self.counts = experts, counts

    def forward(self, x_sorted):
        return self.experts(x_sorted, self.counts)


def with_impl(owner, experts, impl, fn, reference=None):
    """The variant runs its experts through `impl`: "grouped" or "loop" (the stages share one Experts), or
    "modules", the benchmark's `reference` of one module per expert in its place (with the same weights)."""
    def run():
        if impl == "modules":
            owner.experts = reference
        else:
            owner.experts, experts.impl = experts, impl
        fn()
    return run


def build_variants(experts, dim, ffn_dim, sublayers, stages, device, dtype):
    """The modules of one (N, d): a layer per stage sharing one Experts, and the dense FFN. Built once and reused
    for every token count (building N experts of d 1024 takes longer than timing them)."""
    layers, shared = {}, None
    for stage in stages:
        layer = build_layer(experts, dim, ffn_dim, sublayers, stage).to(device=device, dtype=dtype)
        shared = layer.experts = shared or layer.experts  # both stages run the same experts
        layers[stage] = layer
    return layers, build_dense(dim, ffn_dim, sublayers).to(device=device, dtype=dtype), {}


def case_steps(variants, experts, tokens, skewed, impls, device, dtype):
    """name -> zero-argument callable running that variant's step; names: dense, and stage1/stage2/floor
    followed by the experts' implementation (stage1-grouped, floor-loop, ...)."""
    layers, dense, built = variants
    shared = built.setdefault("bank", next(iter(layers.values())).experts)  # a "modules" step swaps the layer's
    if "modules" in impls and "reference" not in built:
        built["reference"] = ModuleExperts(shared).to(device=device, dtype=dtype)
    reference = built.get("reference")
    dim = shared.dim
    x, ids, target = forced_inputs(tokens, experts, dim, skewed, dtype=dtype, device=device)
    grad = torch.randn_like(x)
    steps = {}
    for stage, layer in layers.items():
        layer_x = x.clone().requires_grad_()
        routed = layer.routing.decide(x.reshape(-1, dim), _token_view(ids, x.size(0)))
        assert torch.equal(routed, target), "forced routing did not take"
        layer_step = _bind(step, _LayerCall(layer, ids), [layer_x], [grad])
        for impl in impls:
            steps[f"stage{stage}-{impl}"] = with_impl(layer, shared, impl, layer_step, reference)
    chunks = split_by_expert(x, target, experts)
    floor_x = torch.cat(chunks).requires_grad_()
    floor_grad = torch.cat(split_by_expert(grad, target, experts))
    floor = Floor(shared, [c.size(0) for c in chunks])
    for impl in impls:
        steps[f"floor-{impl}"] = with_impl(floor, shared, impl, _bind(step, floor, [floor_x], [floor_grad]),
                                             reference)
    steps["dense"] = _bind(step, dense, [x.clone().requires_grad_()], [grad])
    return steps


def _token_view(ids, last):
    from fairseq_stablemoe.moe.routing import TokenView
    return TokenView(ids, last, None)


class _LayerCall(torch.nn.Module):
    def __init__(self, layer, ids):
        super().__init__()
        self.layer, self.ids = layer, ids

    def forward(self, x):
        return self.layer(x, self.ids)[0]


def _bind(fn, *args):
    return lambda: fn(*args)


def measure(steps, rounds, warmup, timer, seed=0):
    """Per-variant times of each round; the variants run in a fresh random order every round."""
    rng = random.Random(seed)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    try:
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                times[name].append(timer(steps[name]))
    except KeyboardInterrupt:  # stopped (Ctrl-C or SIGTERM): keep the complete rounds, then stop
        done = min(len(t) for t in times.values())
        if not done:
            raise
        times = {name: t[:done] for name, t in times.items()}
        times["interrupted"] = True
    return times


def median_ratio(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def available_impls(device, dtype, dim, ffn_dim):
    """The experts' implementations this torch runs here: the loop always, grouped where grouped_mm runs."""
    from fairseq_stablemoe.moe.experts import Experts
    probe = Experts([0], dim, ffn_dim, 1)
    return ["grouped", "loop"] if probe.grouped_runs(torch.empty(0, dim, device=device, dtype=dtype)) else ["loop"]


def main():
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped run still prints its complete rounds
    p = common_args(__doc__)
    p.add_argument("--pairs", type=int, default=9, help="interleaved rounds (medians of per-round ratios)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="on CPU: process CPU time or wall time")
    p.add_argument("--quick", action="store_true",
                   help="the acceptance sizes only: N 8/32, 8k tokens, d 512 (plus N 32 at 32k with --tokens)")
    p.add_argument("--experts-impl", nargs="+", choices=["grouped", "loop", "modules"],
                   help="the experts' implementations to time (default: grouped, where a grouped GEMM runs "
                        "for this device and dtype, and loop); modules: the reference of one module per expert "
                        "(the layout before main 26fcf9f), same weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="default: bfloat16 on a GPU, float32 on CPU")
    args = p.parse_args()
    if args.quick:
        args.experts, args.tokens, args.dims = [8, 32], [8192], [512]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, args.clock)
    clock = "CUDA events" if device.type == "cuda" else f"{args.clock} time"
    print(f"# torch {torch.__version__}, {device.type}, {dtype}, {clock}, threads {torch.get_num_threads()}, "
          f"{args.sublayers} sublayers, FFN {args.ffn_mult}d, {args.pairs} interleaved rounds, medians")
    head = ("| N | tokens | d | routing | experts | rounds | dense ms | floor/dense | S1/floor | S2/floor | S1/dense "
            "| S2/dense | S2/S1 | S1/S1 loop |")
    print_table_header(head)
    for dim in args.dims:
        impls = args.experts_impl or available_impls(device, dtype, dim, args.ffn_mult * dim)
        for experts in args.experts:
            variants = build_variants(experts, dim, args.ffn_mult * dim, args.sublayers, args.stages, device, dtype)
            for tokens in args.tokens:
                for routing in args.routing:
                    if routing == "skewed" and experts == 1:
                        continue
                    steps = case_steps(variants, experts, tokens, routing == "skewed", impls, device, dtype)
                    times = measure(steps, args.pairs, args.warmup, timer)
                    interrupted = times.pop("interrupted", False)
                    for impl in impls:
                        print("| " + " | ".join(str(c) for c in row(times, impl, [experts, tokens, dim, routing]))
                              + " |", flush=True)
                    if interrupted:
                        return
                    del steps, times
            del variants
            if device.type == "cuda":
                torch.cuda.empty_cache()


def row(times, impl, case):
    """One table row: the variants run through `impl` against its floor, the dense FFN and the loop."""
    floor = f"floor-{impl}"
    cells = case + [impl, len(times["dense"]), f"{1e3 * statistics.median(times['dense']):.0f}",
                    f"{median_ratio(times, floor, 'dense'):.3f}"]
    for ref in (floor, "dense"):
        for stage in (1, 2):
            name = f"stage{stage}-{impl}"
            cells.append(f"{median_ratio(times, name, ref):.3f}" if name in times else "-")
    s1, s2, loop = f"stage1-{impl}", f"stage2-{impl}", "stage1-loop"
    cells.append(f"{median_ratio(times, s2, s1):.3f}" if s1 in times and s2 in times else "-")
    cells.append(f"{median_ratio(times, s1, loop):.3f}" if s1 in times and loop in times else "-")
    return cells


if __name__ == "__main__":
    main()
