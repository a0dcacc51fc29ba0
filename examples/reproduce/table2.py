"""Paper Table 2 at CPU scale: perplexity of the dense, larger dense and MoE language models, seeds 1..3.

    python examples/reproduce/table2.py [--quick] [--data ../shared/data/lm/sotu] [--out results/reproduce]

Writes OUT/{full,quick}/table2.md: valid and test perplexity (eval-lm, mean ± std over seeds), shared and
expert parameters, forward FLOPs per sequence, and the paper's base-size numbers next to them.
"""
import statistics

from common import human, markdown_table, mean_std, write_report
from lm import TABLE2, setup

PAPER = {  # base size: shared, expert params, FLOPs, valid, test
    "Standard Transformer": ("124M", "N/A", "146B", 23.02, 22.58),
    "Larger Transformer (deeper)": ("578M", "N/A", "610B", 17.93, 17.63),
    "Larger Transformer (wider)": ("578M", "N/A", "610B", 18.31, 18.01),
    "Switch Transformer": ("124M", "454M", "160B", 19.79, 19.20),
    "BASE Layer": ("124M", "454M", "160B", 20.04, 19.69),
    "Hash Layer": ("124M", "454M", "160B", 19.63, 19.25),
    "StableMoE": ("124M", "454M", "160B", 19.28, 18.93),
}


def rows(repro):
    runs = [run.seeded(seed) for run in TABLE2 for seed in repro.seeds()]
    by_name = {}
    for result in repro.results(runs):
        by_name.setdefault(result["name"], []).append(result)
    return by_name


def table(by_name) -> str:
    body = []
    for run in TABLE2:
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


def gaps(by_name) -> str:
    """StableMoE minus each other MoE, seed by seed (the seeds share data order and initial weights' seed)."""
    stable = {r["seed"]: r["valid_ppl"] for r in by_name["StableMoE"]}
    lines = []
    for name in ("Switch Transformer", "BASE Layer", "Hash Layer"):
        diffs = [stable[r["seed"]] - r["valid_ppl"] for r in by_name[name] if r["seed"] in stable]
        spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        wins = sum(d < 0 for d in diffs)
        lines.append(f"- StableMoE − {name}: valid PPL {statistics.mean(diffs):+.2f}{spread} "
                     f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; StableMoE lower in {wins}/{len(diffs)})")
    return "\n".join(lines)


def main():
    repro = setup(__doc__)
    by_name = rows(repro)
    text = (f"# Table 2 at CPU scale\n\n{repro.scale.describe()}.\n\n{table(by_name)}\n\n"
            f"Paired differences (negative: StableMoE better):\n\n{gaps(by_name)}\n")
    write_report(f"{repro.out}/table2.md", text)


if __name__ == "__main__":
    main()
