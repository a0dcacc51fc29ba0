"""The StableMoE routing alone, stage 1 against stage 2: forward and backward of the gate and the routing losses.

    python benchmarks/routing.py --experts 32 --tokens 8192 --dims 512

In the layer the routing is a fraction of a percent of the step (the experts are the rest), so layer.py's S2/S1
is below its resolution; this isolates what the two stages do differently. Same forced routing, interleaving
and clock as layer.py. Prints tables; passes no judgement.
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import build_layer, common_args, forced_inputs, print_table_header  # noqa: E402
from benchmarks.layer import Timer, measure, median_ratio  # noqa: E402
from fairseq_stablemoe.moe.routing import TokenView  # noqa: E402


def routing_step(routing, h, view, grad):
    h.grad = None
    routing.zero_grad(set_to_none=True)
    out = routing(h, view)
    torch.autograd.backward([(out.gate * grad).sum(), *out.losses.values()])


def main():
    p = common_args(__doc__)
    p.set_defaults(experts=[8, 32], tokens=[8192], dims=[512])
    p.add_argument("--pairs", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, cpu time, threads {torch.get_num_threads()}, {args.pairs} interleaved "
          f"rounds, medians")
    print_table_header("| N | tokens | d | routing | S1 ms | S2 ms | S2/S1 |")
    for dim in args.dims:
        for tokens in args.tokens:
            for experts in args.experts:
                for routing in args.routing:
                    x, ids, _ = forced_inputs(tokens, experts, dim, routing == "skewed")
                    h, view = x.reshape(-1, dim).clone().requires_grad_(), TokenView(ids, x.size(0), None)
                    grad = torch.randn(h.size(0))
                    steps = {s: (lambda r=build_layer(experts, dim, dim, 1, s).routing: routing_step(r, h, view, grad))
                             for s in (1, 2)}
                    times = measure(steps, args.pairs, 3, Timer("cpu"))
                    ms = [f"{1e3 * statistics.median(times[s]):.1f}" for s in (1, 2)]
                    print(f"| {experts} | {tokens} | {dim} | {routing} | {' | '.join(ms)} "
                          f"| {median_ratio(times, 2, 1):.3f} |", flush=True)


if __name__ == "__main__":
    main()
