"""What an expert's weights cost to fetch: the experts' products on weights that come from memory, against the
same products on one weight matrix that stays in cache, at the expert layer's shapes.

    python benchmarks/weights.py --experts 32 --rows 128 256 4096 --dims 512

A top-1 MoE layer does the dense FFN's FLOPs, but each of its N experts reads its own weights (forward: x·W1ᵀ and
h·W2ᵀ; backward: the input gradients read W2 and W1 again and the weight gradients write a matrix each), while
the dense FFN reads one set that stays in cache. Where `cold/hot` is high, the experts' floor stays above the
dense FFN however they are laid out (benchmarks/README.md, issue 21).

For each row count: `hot` runs one product per expert on the same weight matrix, `cold` on N different matrices
(as the experts run); `input` is x(rows×d)·Wᵀ (W: 4d×d), `weight grad` is gᵀ·h written into a matrix of W's size.
One thread, CPU time, median of interleaved rounds' ratios. Prints a table; passes no judgement.
"""
import argparse
import random
import statistics
import time

import torch


def products(kind, rows, dim, ffn, experts, dtype):
    """(hot, cold): zero-argument callables running `experts` products on one matrix / on `experts` matrices."""
    weights = [torch.randn(ffn, dim, dtype=dtype) for _ in range(experts)]
    if kind == "input":
        x, bias = torch.randn(rows, dim, dtype=dtype), torch.randn(ffn, dtype=dtype)

        def run(ws):
            for w in ws:
                torch.addmm(bias, x, w.t())
    else:
        grad, h = torch.randn(rows, ffn, dtype=dtype), torch.randn(rows, dim, dtype=dtype)

        def run(ws):
            for w in ws:
                torch.mm(grad.t(), h, out=w)
    return (lambda: run(weights[:1] * experts)), (lambda: run(weights))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=32, help="products per timing (distinct matrices when cold)")
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256, 4096], help="rows per expert")
    p.add_argument("--dims", type=int, nargs="+", default=[512])
    p.add_argument("--ffn-mult", type=int, default=4, help="FFN inner size = this x d")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float32
    print(f"# torch {torch.__version__}, cpu, {dtype}, CPU time, threads {torch.get_num_threads()}, "
          f"{args.experts} products per timing, {args.rounds} interleaved rounds, medians")
    print("| rows | d | FFN | product | hot ms | cold ms | cold/hot |")
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        ffn = args.ffn_mult * dim
        for rows in args.rows:
            for kind in ("input", "weight grad"):
                hot, cold = products(kind, rows, dim, ffn, args.experts, dtype)
                times = {"hot": [], "cold": []}
                hot(), cold()  # warm-up: first touches and the library's one-time set-up
                rng = random.Random(0)
                for _ in range(args.rounds):
                    for name in rng.sample(list(times), 2):
                        start = time.process_time()
                        (hot if name == "hot" else cold)()
                        times[name].append(time.process_time() - start)
                ratio = statistics.median(c / h for c, h in zip(times["cold"], times["hot"]))
                print(f"| {rows} | {dim} | {ffn} | {kind} | {1e3 * statistics.median(times['hot']):.0f} "
                      f"| {1e3 * statistics.median(times['cold']):.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
