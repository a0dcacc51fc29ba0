"""Paper Fig. 4 at CPU scale: valid perplexity against updates and against training time, Table 2's runs.

    python examples/reproduce/fig4.py [--quick] [--data ...] [--out results/reproduce]

Trains what Table 2 has not trained yet (the same runs), then draws OUT/{full,quick}/fig4.png: the mean over
seeds of the perplexity on the curve set (the first lines of valid) at each validation. Time is fairseq's
train_wall: the seconds spent in training steps, validation excluded.
"""
import statistics

from common import markdown_table, write_report
from lm import TABLE2, setup
from table2 import rows


def mean_curve(curves):
    """[(update, mean seconds, mean ppl)] over the seeds' curves, at the updates all of them have."""
    updates = sorted(set.intersection(*[{p["update"] for p in c} for c in curves]))
    curve = []
    for update in updates:
        points = [next(p for p in c if p["update"] == update) for c in curves]
        seconds = [p["train_seconds"] for p in points if p["train_seconds"] is not None]
        curve.append((update, statistics.mean(seconds) if seconds else None,
                      statistics.mean(p["ppl"] for p in points)))
    return curve


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_update, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        by_update.plot([u for u, _, _ in curve], [p for _, _, p in curve], marker=".", label=name)
        timed = [(s, p) for _, s, p in curve if s is not None]
        by_time.plot([s for s, _ in timed], [p for _, p in timed], marker=".", label=name)
    by_update.set(xlabel="updates", ylabel="valid perplexity (curve set)", yscale="log")
    by_time.set(xlabel="training seconds (train_wall, one CPU thread)", ylabel="valid perplexity (curve set)",
                yscale="log")
    for ax in (by_update, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    repro = setup(__doc__)
    rows(repro)  # trains what is missing
    curves = {run.name: mean_curve([repro.curve(run.seeded(seed)) for seed in repro.seeds()]) for run in TABLE2}
    plot(curves, f"{repro.out}/fig4.png")
    last = [[name, curve[-1][0], f"{curve[-1][1]:.0f}" if curve[-1][1] is not None else "–", f"{curve[-1][2]:.2f}"]
            for name, curve in curves.items()]
    text = (f"# Fig. 4 at CPU scale\n\n![valid perplexity against updates and time](fig4.png)\n\n"
            f"Last point of each curve (mean over seeds):\n\n"
            f"{markdown_table(['Model', 'updates', 'train seconds', 'curve-set PPL'], last)}\n")
    write_report(f"{repro.out}/fig4.md", text)


if __name__ == "__main__":
    main()
