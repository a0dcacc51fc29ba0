"""Beyond the paper (issue 20): why Hash layers beat StableMoE at CPU scale. Seeds paired, all rows this code.

    python examples/reproduce/hash_gap.py [--quick | --long | --medium] [--rows all|medium [--extra ROW]] [--jobs N]

Hash and StableMoE differ in three things: the table (Hash: frequency-balanced, or random; StableMoE: learned by
the backbone in stage 1 and distilled), the gate (Hash: none; StableMoE: σ(E_â·h)) and the first 10 % (Hash:
fixed from update 0; StableMoE: a moving routing until the freeze). The rows change one thing at a time:

    Hash Layer                               balanced table, no gate, fixed from 0
    Hash Layer, random table                 random table                              (balance)
    Hash Layer + StableMoE gate              balanced table, σ gate, fixed from 0      (gate on a hash table)
    StableMoE                                learned table, σ gate, stage 1
    StableMoE, stage-2 gate 1                learned table, no gate in stage 2         (gate on the learned table)
    StableMoE table from update 0 + gate     the same seed's StableMoE table, σ gate, fixed from 0   (stage 1)
    StableMoE table from update 0, no gate   the same, no gate                         (table vs Hash's)

"StableMoE table from update 0" reads the table from that seed's StableMoE run (--hash-type file), so it trains
after it. Writes OUT/<mode>/hash_gap.md: perplexities, the paired differences that isolate each factor, and the
gate's distribution at the last validation (SAVE_DIR/expert_loads.json). --rows medium: Hash, StableMoE, the
ablation rows named by --extra, Switch and the standard Transformer, in that order (the medium-mode plan).
"""
import json
import os
import statistics
import sys
from dataclasses import replace

from common import markdown_table, mean_std, run_all, write_report
from lm import TABLE2, moe, setup

STANDARD, SWITCH, HASH, STABLEMOE = TABLE2[0], TABLE2[3], TABLE2[5], TABLE2[6]
HASH_RANDOM = moe("Hash Layer, random table", "hash", "--hash-type", "random")
HASH_GATED = moe("Hash Layer + StableMoE gate", "hash", "--hash-gate", "sigmoid")
GATE_ONE = moe("StableMoE, stage-2 gate 1", "stablemoe", "--stage2-gate", "one")
TABLE_GATED = moe("StableMoE table from update 0 + gate", "hash", "--hash-type", "file", "--hash-gate", "sigmoid")
TABLE_PLAIN = moe("StableMoE table from update 0, no gate", "hash", "--hash-type", "file")
ROWS = [HASH, HASH_RANDOM, HASH_GATED, STABLEMOE, GATE_ONE, TABLE_GATED, TABLE_PLAIN]
NEEDS_TABLE = (TABLE_GATED.name, TABLE_PLAIN.name)

# (what it isolates, row a, row b): a − b, paired by seed
CONTRASTS = [
    ("the gate, on StableMoE's learned table", STABLEMOE, GATE_ONE),
    ("the gate, on Hash's balanced table", HASH_GATED, HASH),
    ("stage 1 (moving first 10 %), gated", STABLEMOE, TABLE_GATED),
    ("stage 1 (moving first 10 %), ungated", GATE_ONE, TABLE_PLAIN),
    ("the learned table vs Hash's, fixed from 0, ungated", TABLE_PLAIN, HASH),
    ("the learned table vs Hash's, fixed from 0, gated", TABLE_GATED, HASH_GATED),
    ("a random vs the balanced hash table", HASH_RANDOM, HASH),
    ("StableMoE vs Hash (the gap)", STABLEMOE, HASH),
    ("StableMoE vs Switch (--rows medium)", STABLEMOE, SWITCH),
    ("StableMoE vs the standard Transformer (--rows medium)", STABLEMOE, STANDARD),
]


def seeded(repro, run, seed):
    """The run for `seed`; a row that reads StableMoE's table names that seed's StableMoE checkpoint."""
    run = run.seeded(seed)
    if run.name in NEEDS_TABLE:
        table = os.path.join(repro.out, "runs", STABLEMOE.seeded(seed).folder, "checkpoint_last.pt")
        run = replace(run, flags=run.flags + ("--hash-table", table))
    return run


def result(repro, run):
    if run.name in NEEDS_TABLE:  # StableMoE of the same seed first (shared, locked: trained once)
        repro.result(STABLEMOE.seeded(run.seed))
    return repro.result(run)


def last_gate(repro, run):
    """The gate's {mean, p10, below_0.1} at the run's last validation, or None (no soft gate, or not recorded)."""
    path = os.path.join(repro.out, "runs", run.folder, "expert_loads.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        validations = json.load(f)["validations"]
    gates = validations[-1].get("gate") if validations else None
    return gates[0] if gates else None


def gate_cell(gates, key, scale=1.0, digits=2):
    values = [g[key] * scale for g in gates if g]
    return mean_std(values, digits) if values else "–"


def report(repro, rows, results) -> str:
    seeds = sorted({seed for _, seed in results})
    body = []
    for row in rows:
        found = [results[row.name, s] for s in seeds if (row.name, s) in results]
        if not found:
            continue
        gates = [last_gate(repro, seeded(repro, row, s)) for s in seeds if (row.name, s) in results]
        body.append([row.name, mean_std([r["valid_ppl"] for r in found]), mean_std([r["test_ppl"] for r in found]),
                     len(found), gate_cell(gates, "mean"), gate_cell(gates, "p10"),
                     gate_cell(gates, "below_0.1", 100, 1)])
    table = markdown_table(["Row", "Valid PPL", "Test PPL", "seeds", "gate mean", "gate 10th pct",
                            "gate < 0.1 (%)"], body)
    lines = []
    for what, a, b in CONTRASTS:
        diffs = [results[a.name, s]["valid_ppl"] - results[b.name, s]["valid_ppl"] for s in seeds
                 if (a.name, s) in results and (b.name, s) in results]
        if diffs:
            spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
            lines.append(f"- {what}: {a.name} − {b.name} = {statistics.mean(diffs):+.2f}{spread} valid PPL "
                         f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; lower in "
                         f"{sum(d < 0 for d in diffs)}/{len(diffs)})")
    return (f"# Why Hash beats StableMoE: the table, the gate and stage 1 ({repro.out.rstrip('/').split('/')[-1]} "
            f"mode)\n\n{repro.scale.describe()}.\n\n{table}\n\nGate: the routing's soft gate, StableMoE's σ(E·h) "
            f"(Hash with --hash-gate sigmoid: on the table's expert; Switch: its softmax probability), over the "
            f"curve set at the last validation; in stage 2 for StableMoE (–: no soft gate).\n\nPaired differences, valid PPL (negative: the first row better):\n\n"
            + "\n".join(lines) + "\n")


def plan(repro):
    if repro.args.rows == "medium":
        named = {row.name: row for row in ROWS}
        unknown = [name for name in repro.args.extra if name not in named]
        if unknown:
            sys.exit(f"--extra {unknown[0]!r} is not a row; choose among: {', '.join(named)}")
        return [HASH, STABLEMOE, *[named[name] for name in repro.args.extra], SWITCH, STANDARD]
    return ROWS


def arguments(p):
    p.add_argument("--rows", choices=("all", "medium"), default="all",
                   help="all: the seven rows above; medium: Hash, StableMoE, the --extra rows, Switch, standard")
    p.add_argument("--extra", action="append", default=[], metavar="ROW",
                   help="--rows medium: an ablation row to add, by its name (repeatable)")


def main():
    repro = setup(__doc__, arguments)
    rows = plan(repro)
    runs = [seeded(repro, row, seed) for seed in repro.seeds() for row in rows]  # seed-major: seed 1 first
    if repro.args.finished:
        runs = [run for run in runs if repro.finished(run)]
    done = run_all([lambda run=run: result(repro, run) for run in runs], repro.args.jobs)
    results = {(run.name, run.seed): r for run, r in zip(runs, done)}
    write_report(f"{repro.out}/hash_gap.md", report(repro, rows, results))


if __name__ == "__main__":
    main()
