"""Paper Figs. 2 and 7 at CPU scale: when tokens last change expert, for Switch, BASE, Hash and StableMoE.

    python examples/reproduce/fig2.py [--quick] [--data ...] [--out results/reproduce]

Uses Table 2's seed-1 runs, which record every --routing-probe-interval updates the expert each of the first
--routing-probe-tokens tokens of the curve set would be trained with (StableMoE: the backbone's choice in
stage 1, the frozen router's in stage 2). A token's last fluctuation step is the last probe at which its
expert differs from its final one. Writes OUT/{full,quick}/fig2.md and fig2.png (the CDF and the change rate).
"""
import os

from common import markdown_table, write_report
from lm import TABLE2, setup

PERCENTS = (20, 50, 80)


def main():
    from fairseq_stablemoe.analysis.fluctuation import plot, summarize
    from fairseq_stablemoe.tasks.routing_probes import load_probes

    repro = setup(__doc__)
    runs = [r for r in TABLE2 if r.routing in ("switch", "base", "hash", "stablemoe")]
    repro.results(runs)
    records, body = [], []
    for run in runs:
        record = load_probes(os.path.join(repro.out, "runs", run.folder))
        records.append((run.name, record))
        for layer in summarize(record, PERCENTS):
            shares = [f"{100 * layer['share_after'][p]:.1f} %" for p in PERCENTS]
            rates = layer["change_rates"]
            body.append([run.name, *shares, f"{100 * max(rates):.1f} %", f"{100 * rates[-1]:.1f} %"])
    plot(records, f"{repro.out}/fig2.png")
    probes = records[0][1]
    header = ["Routing"] + [f"last change after {p} %" for p in PERCENTS] + ["max change rate", "last change rate"]
    text = (f"# Figs. 2 / 7 at CPU scale: routing fluctuation (seed 1)\n\n{repro.scale.describe()}.\n\n"
            f"{len(probes['updates'])} probes of {probes['tokens'][0].numel():,} curve-set tokens, every "
            f"{repro.scale.probe_interval} updates. Share of tokens whose last fluctuation step is after 20/50/80 % "
            f"of training; change rate: share of tokens whose expert changed since the previous probe.\n\n"
            f"{markdown_table(header, body)}\n\n![CDF of the last fluctuation step](fig2.png)\n")
    write_report(f"{repro.out}/fig2.md", text)


if __name__ == "__main__":
    main()
