"""Beyond the paper: --stage1-updates auto against the fixed 10 % stage 1 (StableMoE, seeds 1..3).

    python examples/reproduce/stage1_auto.py [--quick | --long] [--data ...] [--out results/reproduce]

Both rows train with this checkout's code under the same flags, seed by seed; auto probes every 25 updates in
long mode (the default thresholds: route_change < 0.02 and the router's agreement rising < 0.005 at 3 probes in
a row, at the latest at a fifth of training). Writes OUT/<mode>/stage1_auto.md: valid/test perplexity, the
paired difference, and where and why each auto run ended stage 1.
"""
import os
import re
import statistics

from common import markdown_table, mean_std, write_report
from lm import LONG, moe, setup

FIXED = moe("StableMoE, stage 1 = 10 %", "stablemoe")


def auto(scale):
    interval = max(1, scale.probe_interval // 4)  # 25 updates in long mode: several probes within the first 10 %
    return moe("StableMoE, stage 1 auto", "stablemoe", "--stage1-updates", "auto",
               "--routing-probe-interval", str(interval))


def switch_of(folder: str) -> str:
    """Where and why stage 1 ended, from the run's log."""
    with open(os.path.join(folder, "train.log")) as f:
        found = re.findall(r"update (\d+): \d+ MoE layer\(s\) enter stage 2;[^(\n]*(?:\(--stage1-updates auto: "
                           r"([^\n]*)\))?", f.read())
    if not found:
        return "never"
    update, why = found[-1]
    return f"update {update}" + (f": {why}" if why else "")


if __name__ == "__main__":
    repro = setup(__doc__)
    rows = [FIXED, auto(repro.scale)]
    runs = [run.seeded(seed) for seed in repro.seeds() for run in rows]
    results = dict(zip([(run.name, run.seed) for run in runs], repro.results(runs)))
    body = [[run.name, mean_std([results[run.name, s]["valid_ppl"] for s in repro.seeds()]),
             mean_std([results[run.name, s]["test_ppl"] for s in repro.seeds()]),
             "; ".join(f"seed {s}: {switch_of(os.path.join(repro.out, 'runs', run.seeded(s).folder))}"
                       for s in repro.seeds())] for run in rows]
    diffs = [results[rows[1].name, s]["valid_ppl"] - results[rows[0].name, s]["valid_ppl"] for s in repro.seeds()]
    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    text = (f"# --stage1-updates auto against a fixed 10 % stage 1 ({'long' if repro.scale is LONG else 'CPU'} "
            f"scale)\n\n{repro.scale.describe()}.\n\n"
            + markdown_table(["StableMoE", "Valid PPL", "Test PPL", "stage 1 ended"], body)
            + f"\n\nauto − fixed, valid PPL, paired by seed: {statistics.mean(diffs):+.2f}{spread} "
              f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; auto lower in {sum(d < 0 for d in diffs)}/"
              f"{len(diffs)})\n")
    write_report(f"{repro.out}/stage1_auto.md", text)
