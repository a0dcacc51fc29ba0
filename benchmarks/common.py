"""What the benchmarks share: building an MoE layer, its FLOP-matched dense FFN, its floor, and forced routing."""
import argparse
import os
import random
import resource
import statistics
import subprocess

import torch
import torch.nn as nn

from fairseq_stablemoe.moe import MoEConfig, Vocabulary, build_moe_layer
from fairseq_stablemoe.moe.experts import build_expert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 1
TOKENS_PER_ROW = 512  # tokens of a batch are B rows of this length (B x S ids, S x B x C states)
IDS_PER_EXPERT = 8  # vocabulary = IDS_PER_EXPERT x N ids; the stage-2 table sends id v to expert v mod N


def moe_config(experts: int, sublayers: int) -> MoEConfig:
    return MoEConfig(moe_experts=experts, moe_sublayers=sublayers, moe_routing="stablemoe", stage1_updates=0,
                     distilled_router="wordemb", distilled_dim=50)


def vocab_size(experts: int) -> int:
    return max(IDS_PER_EXPERT * experts, 2 * PAD + 2)


def build_layer(experts, dim, ffn_dim, sublayers, stage):
    """A StableMoE layer whose routing the benchmark controls (see `forced_inputs`).

    Stage 1 routes by argmax of E·h: the centroids are scaled unit vectors, so a token goes to the expert whose
    coordinate of h carries a large bump. Stage 2 routes by the frozen word-embedding router's table, which the
    benchmark sets to id -> id mod N.
    """
    layer = build_moe_layer(moe_config(experts, sublayers), dim, ffn_dim, Vocabulary(vocab_size(experts), PAD))
    with torch.no_grad():
        layer.routing.centroids.zero_()
        layer.routing.centroids[:, :experts].copy_(0.1 * torch.eye(experts))
        for p in layer.experts.parameters():  # ff2 is zero-initialised: give every expert real work to do
            if p.dim() == 2 and not p.abs().sum():
                nn.init.normal_(p, std=0.02)
    if stage == 2:
        layer.routing.end_stage1(0)
        table = layer.routing.distilled_router.table
        table.copy_(torch.arange(table.numel()) % experts)
    return layer.train()


def build_dense(dim, ffn_dim, sublayers):
    """The FLOP-matched dense control: one expert's stack, run on every token."""
    return build_expert(dim, ffn_dim, sublayers).train()


class ModuleExperts(nn.Module):
    """Benchmark-only reference: the experts as the plugin kept them before main 26fcf9f stacked them, one
    module (fairseq's LayerNorm and nn.Linear, autograd's backward) per expert, with the same weights as `bank`."""

    def __init__(self, bank):
        super().__init__()
        self.experts = nn.ModuleList(build_expert(bank.dim, bank.ffn_dim, bank.sublayers) for _ in bank.global_ids)
        state = {f"{j}.{key.split('.', 1)[1]}": value for key, value in bank.expert_state().items()
                 for j in [bank.global_ids.index(int(key.split(".")[0]))]}
        self.experts.load_state_dict(state)

    def forward(self, x_sorted, counts):
        outputs = [expert(chunk) if chunk.size(0) else chunk for expert, chunk in zip(self.experts, x_sorted.split(counts))]
        return torch.cat(outputs)


def target_experts(tokens, experts, skewed, generator):
    """Each token's expert: balanced (uniform, equal loads) or skewed (half the tokens to expert 0)."""
    target = torch.arange(tokens) % experts
    if skewed and experts > 1:
        half = tokens // 2
        target[:half] = 0
        target[half:] = 1 + torch.arange(tokens - half) % (experts - 1)
    return target[torch.randperm(tokens, generator=generator)]


def forced_inputs(tokens, experts, dim, skewed, seed=0, dtype=torch.float32, device="cpu"):
    """Hidden states (S x B x C) and token ids (B x S) that both stages route to the same chosen experts."""
    g = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // TOKENS_PER_ROW)
    seq = tokens // rows
    target = target_experts(rows * seq, experts, skewed, g)  # time-major order, like the layer's flat view
    h = torch.randn(rows * seq, dim, generator=g)
    h[torch.arange(h.size(0)), target] += 20.0  # the chosen expert's affinity beats every other by far
    ids = target + experts * torch.randint(PAD // experts + 1, IDS_PER_EXPERT, (target.numel(),), generator=g)
    ids = ids.view(seq, rows).t().contiguous()
    assert not ids.eq(PAD).any()
    x = h.view(seq, rows, dim).to(device=device, dtype=dtype)
    return x, ids.to(device), target.to(device)


def split_by_expert(x, target, experts):
    """The floor's input: the tokens of each expert, already gathered into their own tensor."""
    flat = x.reshape(-1, x.size(-1))
    return [flat[target == e].clone() for e in range(experts)]


def common_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    p.add_argument("--routing", nargs="+", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--sublayers", type=int, default=3)
    p.add_argument("--ffn-mult", type=int, default=4, help="expert FFN inner size = this x d")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine one thread gives steadier ratios)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def print_table_header(columns: str):
    """A markdown table's header row and its separator."""
    print(columns)
    print("|" + "---|" * (columns.count("|") - 1))


def run_counting_cpu(cmd, env):
    """Run a command to its end; its stdout+stderr and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{run.stderr[-3000:]}")
    return run.stdout + run.stderr, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def interleaved(names, repeats, run, seed=0):
    """name -> [run(name) of each repeat]: every repeat runs every name once, in a fresh random order, so load
    from other processes falls on all of them alike."""
    names, rng = list(names), random.Random(seed)
    results = {name: [] for name in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            results[name].append(run(name))
    return results


def print_ratio_rows(names, tables, reference):
    """One markdown row per name: for each table (name -> per-repeat figures), the median and the median over
    repeats of the per-repeat ratio to the reference."""
    for name in names:
        row = [name]
        for table in tables:
            row.append(f"{statistics.median(table[name]):.0f}")
            row.append(f"{statistics.median(a / b for a, b in zip(table[name], table[reference])):.3f}")
        print("| " + " | ".join(row) + " |")


def plugin_env(**extra):
    """os.environ for a subprocess, with this checkout first on PYTHONPATH and what was there kept (a folder of
    carried wheels, say)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), **extra)
