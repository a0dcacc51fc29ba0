"""Routing fluctuation from the probes recorded with --routing-probe-interval (paper §1.1, Figs. 2 and 7).

    stablemoe-fluctuation SAVE_DIR [SAVE_DIR ...] [--after 20 50 80] [--plot fluctuation.png]
    (the same: python -m fairseq_stablemoe.analysis.fluctuation ...)

SAVE_DIR is a fairseq-train --save-dir trained with --routing-probe-interval K; e.g., comparing two runs:

    stablemoe-fluctuation results/fluctuation/stablemoe results/fluctuation/switch --plot compare.png

A token's last fluctuation step is the last probed update at which its expert differs from its expert
at the final probe (0 if it never differs). Printed per MoE layer: the share of probe tokens whose last
fluctuation step lies after 20/50/80 % of training (the final probed update), and the share of tokens
whose expert changed between consecutive probes.
"""
import argparse
import os
import sys
from typing import Dict, List, Sequence

import torch

from ..tasks.routing_probes import load_probes
from . import load_or_exit, pyplot, quiet_logging, save_figure


def change_rates(experts: torch.Tensor) -> torch.Tensor:
    """(P, n) experts per probe -> (P-1,): share of tokens whose expert differs from the previous probe."""
    return (experts[1:] != experts[:-1]).float().mean(1)


def last_fluctuation_steps(updates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(n,): the last probed update at which each token's expert differs from its final one, 0 if never."""
    differs = experts != experts[-1]
    position = torch.arange(len(updates)).unsqueeze(1).expand_as(differs)
    last = torch.where(differs, position, torch.full_like(position, -1)).max(0).values
    return torch.where(last >= 0, updates[last.clamp(min=0)], torch.zeros_like(last))


def share_after(last_steps: torch.Tensor, total: int, percents: Sequence[float]) -> Dict[float, float]:
    """{p: share of tokens whose last fluctuation step is after p % of `total` updates}."""
    return {p: (last_steps.double() > p / 100 * total).double().mean().item() for p in percents}


def summarize(record: dict, percents: Sequence[float]) -> List[dict]:
    updates = record["updates"]
    total = int(updates[-1])
    return [{
        "layer": name,
        "num_experts": num_experts,
        "share_after": share_after(last_fluctuation_steps(updates, experts.long()), total, percents),
        "change_rates": change_rates(experts.long()).tolist(),
    } for name, num_experts, experts in zip(record["layers"], record["num_experts"], record["experts"])]


def report(path: str, record: dict, layers: List[dict], percents: Sequence[float]) -> str:
    updates = record["updates"].tolist()
    lines = [f"{path}: {len(updates)} probes, updates {updates[0]}..{updates[-1]}, "
             f"{len(layers)} MoE layer(s), {record['tokens'][0].numel():,} probe tokens"]
    for layer in layers:
        shares = " / ".join(f"{100 * s:.1f}%" for s in layer["share_after"].values())
        after = " / ".join(f"{p:g}%" for p in layer["share_after"])
        lines.append(f"  {layer['layer']} ({layer['num_experts']} experts): last fluctuation step after "
                     f"{after} of training: {shares} of tokens")
    lines.append("  expert changed since the previous probe (share of tokens):")
    lines.append("    " + f"{'update':>8}" + "".join(f"  {layer['layer']:>18}" for layer in layers))
    for i, update in enumerate(updates[1:]):
        lines.append("    " + f"{update:>8}" + "".join(f"  {100 * layer['change_rates'][i]:>17.2f}%"
                                                       for layer in layers))
    return "\n".join(lines)


def plot(runs, out: str):
    plt = pyplot()

    fig, (cdf_ax, change_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, record in runs:
        updates = record["updates"]
        total = max(int(updates[-1]), 1)
        for name, experts in zip(record["layers"], record["experts"]):
            tag = f"{label} {name}" if len(runs) > 1 else name
            steps = torch.sort(last_fluctuation_steps(updates, experts.long())).values.double() / total * 100
            share = torch.arange(1, len(steps) + 1, dtype=torch.double) / len(steps) * 100
            cdf_ax.step(torch.cat([torch.zeros(1), steps]), torch.cat([torch.zeros(1), share]), where="post",
                        label=tag)
            change_ax.plot(updates[1:], change_rates(experts.long()) * 100, marker=".", label=tag)
    cdf_ax.set(xlabel="last fluctuation step (% of training)", ylabel="cumulative % of tokens",
               title="Last fluctuation step", xlim=(0, 100), ylim=(0, 100))
    change_ax.set(xlabel="update", ylabel="% of tokens", title="Expert changed since the previous probe")
    for ax in (cdf_ax, change_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(fig, out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stablemoe-fluctuation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="SAVE_DIR",
                        help="a --save-dir trained with --routing-probe-interval, or its routing_probes.pt")
    parser.add_argument("--after", type=float, nargs="+", default=[20, 50, 80], metavar="PERCENT",
                        help="report the share of tokens whose last fluctuation step is after these %% of training")
    parser.add_argument("--plot", metavar="PNG", help="write the CDF and change-rate curves to this PNG file")
    args = parser.parse_args(argv)
    quiet_logging()
    runs = []
    for path in args.paths:
        record = load_or_exit(load_probes, path, parser.prog)
        if len(record["updates"]) < 2:
            sys.exit(f"{path}: only {len(record['updates'])} probe(s) recorded; fluctuation needs at least 2")
        print(report(path, record, summarize(record, args.after), args.after))
        run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        runs.append((os.path.basename(os.path.normpath(run_dir)), record))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
