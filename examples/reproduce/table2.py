"""Paper Table 2 at CPU scale: perplexity of the dense, larger dense and MoE language models, seeds 1..3.

    python examples/reproduce/table2.py [--quick | --long] [--data ../shared/data/lm/sotu] [--out results/reproduce]

Writes OUT/{full,quick,long}/table2.md: valid and test perplexity (eval-lm, mean ± std over seeds), shared and
expert parameters, forward FLOPs per sequence, and the paper's base-size numbers next to them. --long: 2,000
updates of a smaller model (lm.LONG), the rows standard, Switch, BASE, Hash, StableMoE, BASE + fixed routing,
and for each routing frozen after stage 1 what it froze (router agreement, stage-1 coverage, load).
"""
import statistics

from common import human, markdown_table, mean_std, write_report
from lm import TABLE2, TABLE2_LONG, setup

PAPER = {  # base size: shared, expert params, FLOPs, valid, test
    "Standard Transformer": ("124M", "N/A", "146B", 23.02, 22.58),
    "Larger Transformer (deeper)": ("578M", "N/A", "610B", 17.93, 17.63),
    "Larger Transformer (wider)": ("578M", "N/A", "610B", 18.31, 18.01),
    "Switch Transformer": ("124M", "454M", "160B", 19.79, 19.20),
    "BASE Layer": ("124M", "454M", "160B", 20.04, 19.69),
    "Hash Layer": ("124M", "454M", "160B", 19.63, 19.25),
    "StableMoE": ("124M", "454M", "160B", 19.28, 18.93),
    "BASE fixed routing": ("124M", "454M", "160B", 19.41, "–"),  # Table 5; no test PPL there
}


def table_rows(repro):
    return TABLE2_LONG if repro.args.long else TABLE2


def rows(repro):
    # seed-major: an interrupted run of the entry point leaves whole seeds of every row
    runs = [run.seeded(seed) for seed in repro.seeds() for run in table_rows(repro)]
    if repro.args.finished:
        runs = [run for run in runs if repro.finished(run)]
    by_name = {}
    for result in repro.results(runs):
        by_name.setdefault(result["name"], []).append(result)
    return by_name


def table(by_name, runs) -> str:
    body = []
    for run in runs:
        results = by_name[run.name]
        first = results[0]
        paper = PAPER[run.name]
        body.append([
            run.name, human(first["shared_params"]) + (f" + {human(first['router_params'])} router"
                                                       if first.get("router_params") else ""),
            human(first["expert_params"]) if first["expert_params"] else "N/A",
            human(first["flops_per_sequence"]), mean_std([r["valid_ppl"] for r in results]),
            mean_std([r["test_ppl"] for r in results]), len(results),
            paper[0], paper[1], paper[2], paper[3], paper[4]])
    return markdown_table(["Model", "Shared", "Expert", "FLOPs/seq", "Valid PPL", "Test PPL", "seeds",
                           "paper shared", "paper expert", "paper FLOPs", "paper valid", "paper test"], body)


GAPS = ("Switch Transformer", "BASE Layer", "Hash Layer")


def gaps(by_name, others=GAPS) -> str:
    """StableMoE minus each other row, seed by seed (the seeds share data order and initial weights' seed)."""
    stable = {r["seed"]: r["valid_ppl"] for r in by_name.get("StableMoE", [])}
    lines = []
    for name in others:
        diffs = [stable[r["seed"]] - r["valid_ppl"] for r in by_name.get(name, []) if r["seed"] in stable]
        if not diffs:
            continue
        spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        wins = sum(d < 0 for d in diffs)
        lines.append(f"- StableMoE − {name}: valid PPL {statistics.mean(diffs):+.2f}{spread} "
                     f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; StableMoE lower in {wins}/{len(diffs)})")
    return "\n".join(lines)


def pct(values, digits=1):
    return mean_std([100 * v if v is not None else None for v in values], digits)


def frozen(by_name, runs) -> str:
    """What each routing frozen after stage 1 froze (lm.freeze_report), mean ± std over seeds."""
    body = []
    for run in runs:
        reports = [r["freeze"] for r in by_name[run.name] if r.get("freeze")]
        if reports:
            ends = sorted({str(f["agreement_update"]) for f in reports if f["agreement_update"] is not None})
            body.append([run.name, ", ".join(ends) or "–", pct([f["agreement"] for f in reports]),
                         pct([f["valid_seen_share"] for f in reports], 2),
                         mean_std([f["valid_load_max_mean"] for f in reports])])
    return markdown_table(["Routing", "stage 1 ends at update", "router agrees with the backbone (%)",
                           "valid tokens of a type seen in stage 1 (%)", "frozen routing's valid load max/mean"],
                          body)


def main():
    repro = setup(__doc__)
    by_name = rows(repro)
    runs = [run for run in table_rows(repro) if run.name in by_name]
    others = [run.name for run in runs if run.name != "StableMoE"] if repro.args.long else GAPS
    title = "Table 2 at CPU scale" + (" (long mode)" if repro.args.long else "") + \
        (": the runs finished so far" if repro.args.finished else "")
    text = (f"# {title}\n\n{repro.scale.describe()}.\n\n{table(by_name, runs)}\n\n"
            f"Paired differences (negative: StableMoE better):\n\n{gaps(by_name, others)}\n")
    if repro.args.long:
        seconds = [[run.name, mean_std([r.get("train_seconds") for r in by_name[run.name]], 0)] for run in runs]
        text += (f"\nWhat the routing froze (the router's agreement: the last training-log interval of stage 1; "
                 f"load: over the first {repro.scale.eval_lines} lines of valid):\n\n{frozen(by_name, runs)}\n\n"
                 f"Training seconds (fairseq's train_wall, one thread, shared machine):\n\n"
                 f"{markdown_table(['Model', 'seconds'], seconds)}\n")
    write_report(f"{repro.out}/table2.md", text)


if __name__ == "__main__":
    main()
