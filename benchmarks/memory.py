"""Peak memory of one forward+backward step of the MoE layer, against its parameters and the dense step.

    python benchmarks/memory.py --experts 32 --tokens 8192 --dims 512

Each measurement runs in a fresh process. On CPU it reads the resident set (VmRSS/VmHWM of /proc/self/status,
the peak reset through /proc/self/clear_refs; resource.getrusage's maxrss where that is not allowed), with glibc's
mmap threshold pinned so that freed tensors go back to the system. On a GPU it reads torch.cuda.max_memory_allocated.
A step starts with gradients at None (as after optimizer.zero_grad()), so its peak includes the gradients it creates.

Gradient memory that the experts' bank keeps from one step to the next counts in the step's peak. `--reference`
adds rows for the benchmark's one-module-per-expert reference (stage "1-modules", "2-modules").

Columns: params = the module's parameters; grads = the same size again; dense act = what the dense step holds on
top of its parameters and gradients (its activations); layer step = the layer's peak above its parameters.
Prints tables; passes no judgement.
"""
import json
import os
import resource
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import (ModuleExperts, build_dense, build_layer, common_args,  # noqa: E402
                               forced_inputs, plugin_env, print_table_header)

MB = 2 ** 20


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_one(variant, experts, tokens, dim, ffn_dim, sublayers, skewed, device):
    """Bytes: the module's parameters, and its step's peak above the memory held before the step."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    before_module = _status_kb("VmRSS") * 1024 if not cuda else 0
    if variant == "dense":
        module = build_dense(dim, ffn_dim, sublayers).to(device=device, dtype=dtype)
    else:
        stage, _, impl = variant.partition("-")
        module = build_layer(experts, dim, ffn_dim, sublayers, int(stage[-1])).to(device=device, dtype=dtype)
        if impl == "modules":
            module.experts = ModuleExperts(module.experts)
    x, ids, _ = forced_inputs(tokens, experts, dim, skewed, dtype=dtype, device=device)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x) if variant == "dense" else module(x, ids)[0]
        out.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    step()  # warm-up: one-time allocations of the libraries are not the layer's
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    # gradient memory the bank keeps from one step to the next counts as the step's, not as memory held before it
    kept = sum(t.numel() * t.element_size() for m in module.modules() for t, _ in
               getattr(getattr(m, "gradient_memory", None), "kept", {}).values())
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak, how = torch.cuda.max_memory_allocated(), "max_allocated"
    elif not os.environ.get("MALLOC_MMAP_THRESHOLD_") and _reset_peak():
        # glibc as a training process runs it: what it keeps of freed memory counts, as does the bank's
        step(), step(), step()
        return {"params": params, "step": _status_kb("VmHWM") * 1024 - before_module - params,
                "how": "VmHWM, 3 steps"}
    elif _reset_peak():
        base = _status_kb("VmRSS") * 1024
        step()
        peak, how = _status_kb("VmHWM") * 1024, "VmHWM"
    else:
        base = _status_kb("VmRSS") * 1024
        step()
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "maxrss"
    return {"params": params, "step": peak - base + kept, "how": how}


def run_isolated(variant, args, experts, tokens, dim, skewed):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--experts", str(experts),
           "--tokens", str(tokens), "--dims", str(dim), "--routing", "skewed" if skewed else "balanced",
           "--sublayers", str(args.sublayers), "--ffn-mult", str(args.ffn_mult), "--threads", str(args.threads),
           "--device", args.device]
    env = plugin_env(**({} if args.malloc == "default" else {"MALLOC_MMAP_THRESHOLD_": "65536"}))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = common_args(__doc__)
    p.set_defaults(experts=[32], tokens=[8192], dims=[512], routing=["balanced"])
    p.add_argument("--one", help=argparse_hidden())
    p.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                   help="pinned: glibc's mmap threshold at 64 KB, so freed tensors go back to the system, and the "
                        "step's own peak; default: glibc as training runs it, the process's peak over 3 steps "
                        "above the memory before the module was built, less the parameters")
    p.add_argument("--reference", action="store_true",
                   help="also the benchmark's reference of one module per expert (the layout before main 26fcf9f)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args.experts[0], args.tokens[0], args.dims[0],
                                     args.ffn_mult * args.dims[0], args.sublayers,
                                     args.routing[0] == "skewed", args.device)))
        return
    print(f"# {args.device}, {args.sublayers} sublayers, FFN {args.ffn_mult}d, malloc {args.malloc}; MB = 2^20 bytes")
    head = ("| N | tokens | d | routing | stage | params MB | dense act MB | layer step MB | layer peak MB "
            "| peak/(params+dense act) | peak/(params+grads+dense act) | how |")
    print_table_header(head)
    for dim in args.dims:
        for tokens in args.tokens:
            dense = run_isolated("dense", args, 1, tokens, dim, False)
            dense_act = dense["step"] - dense["params"]  # its step holds its gradients and its activations
            for experts in args.experts:
                for routing in args.routing:
                    for stage in [f"{s}{impl}" for s in args.stages for impl in
                                  ["", "-modules"][:1 + args.reference]]:
                        r = run_isolated(f"stage{stage}", args, experts, tokens, dim, routing == "skewed")
                        peak = r["params"] + r["step"]
                        row = [experts, tokens, dim, routing, stage, f"{r['params'] / MB:.0f}",
                               f"{dense_act / MB:.0f}", f"{r['step'] / MB:.0f}", f"{peak / MB:.0f}",
                               f"{peak / (r['params'] + dense_act):.2f}",
                               f"{peak / (2 * r['params'] + dense_act):.2f}", r["how"]]
                        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
