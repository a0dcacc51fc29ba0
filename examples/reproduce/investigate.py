"""Why StableMoE ranks where it does in Table 2 at CPU scale: its balance factor and learning rate, seed 1.

    python examples/reproduce/investigate.py [--quick] [--data ...] [--out results/reproduce]

Stage-1 length is Table 6's question; this adds the two other knobs the paper fixes: α (0.3) and the learning
rate, for StableMoE and, at the other learning rate, for the best other MoE of Table 2, so that a change is
not read as StableMoE's alone. It also reads, from the log, how well the distilled router agrees with the
backbone's routing through training. Writes OUT/{full,quick}/investigate.md.
"""
import json
import os
import statistics

from common import markdown_table, write_report
from lm import STABLEMOE, TABLE2, moe, setup


def agreement_curve(repro, run):
    """[(update, mean stage, distill_acc)] of each training log interval: in stage 1 the distilled router's
    agreement with the assignment it learns, in stage 2 the frozen router's with the backbone's argmax now."""
    points = []
    with open(os.path.join(repro.out, "runs", run.folder, "train.log")) as f:
        for line in f:
            if "| train_inner | " in line:
                stats = json.loads(line.split("| train_inner | ", 1)[1])
                points.append((int(stats["num_updates"]), float(stats["stage"]), float(stats["distill_acc"])))
    return points


def main():
    repro = setup(__doc__)
    table2 = repro.results([r.seeded(s) for r in TABLE2 for s in repro.seeds()])
    ppl = {r.name: statistics.mean(x["valid_ppl"] for x in table2 if x["name"] == r.name) for r in TABLE2}
    rival = min((r for r in TABLE2 if r.routing in ("switch", "base", "hash")), key=lambda r: ppl[r.name])
    lr = repro.scale.lr / 3
    rows = [
        ("StableMoE, α 0.3, lr %g (Table 2)" % repro.scale.lr, STABLEMOE),
        ("StableMoE, α 0.1", moe("StableMoE alpha 0.1", "stablemoe", "--balance-factor", "0.1")),
        ("StableMoE, α 1.0", moe("StableMoE alpha 1", "stablemoe", "--balance-factor", "1.0")),
        (f"StableMoE, lr {lr:g}", moe("StableMoE low lr", "stablemoe", "--lr", str(lr))),
        (f"{rival.name}, lr {repro.scale.lr:g} (Table 2)", rival),
        (f"{rival.name}, lr {lr:g}", moe(f"{rival.name} low lr", rival.routing, "--lr", str(lr))),
    ]
    results = repro.results([run for _, run in rows])
    body = [[label, f"{r['valid_ppl']:.2f}", f"{r['test_ppl']:.2f}"] for (label, _), r in zip(rows, results)]
    curve = agreement_curve(repro, STABLEMOE)
    text = (f"# StableMoE's knobs at CPU scale (seed 1)\n\n{repro.scale.describe()}.\n\n"
            f"{markdown_table(['Run', 'Valid PPL', 'Test PPL'], body)}\n\n"
            f"StableMoE (Table 2, seed 1): routing agreement per log interval (stage 1: distilled router vs the "
            f"backbone's assignment it learns; stage 2: frozen router vs the backbone's current argmax):\n\n"
            + markdown_table(["update", "mean stage", "agreement"],
                             [[u, f"{st:.2f}", f"{100 * a:.1f} %"] for u, st, a in curve]) + "\n")
    write_report(f"{repro.out}/investigate.md", text)


if __name__ == "__main__":
    main()
