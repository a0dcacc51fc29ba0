"""Each expert's load per MoE layer at each validation of a training run (SAVE_DIR/expert_loads.json, which
fairseq-train writes under our tasks).

    stablemoe-expert-load checkpoints                   # the last validation: tokens, max/mean, cv, unused, shares
    stablemoe-expert-load checkpoints --all             # every validation
    stablemoe-expert-load checkpoints --plot loads.png  # per layer, each expert's share over training
    (the same: python -m fairseq_stablemoe.analysis.expert_load ...)
"""
import argparse
import sys
from typing import List

from ..tasks.expert_load_record import load_expert_loads
from . import load_or_exit, pyplot, quiet_logging, save_figure


def spread(load: List[int]) -> str:
    total = sum(load)
    mean = total / len(load) if load else 0.0
    if mean == 0:
        return f"{total:>9} tokens"
    cv = (sum((x - mean) ** 2 for x in load) / len(load)) ** 0.5 / mean
    return (f"{total:>9} tokens  max/mean {max(load) / mean:5.2f}  cv {cv:5.2f}  "
            f"unused {sum(x == 0 for x in load)}/{len(load)}")


def report(record: dict, every: bool) -> str:
    validations = record["validations"] if every else record["validations"][-1:]
    lines = []
    for v in validations:
        lines.append(f"update {v['update']} (validation subset {v['subset']}):")
        for name, load in zip(record["layers"], v["load"]):
            total = max(sum(load), 1)
            lines.append(f"  {name}: {spread(load)}")
            lines.append("    share % " + " ".join(f"{100 * x / total:.1f}" for x in load))
    return "\n".join(lines)


def plot(record: dict, out: str):
    """Per layer: each expert's share of the tokens (rows) at each validation (columns)."""
    plt = pyplot()

    layers = record["layers"]
    first = [v for v in record["validations"] if v["subset"] == 0]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 + 3 * len(layers), 4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], layers)):
        share = [[100 * x / max(sum(v["load"][i]), 1) for x in v["load"][i]] for v in first]
        image = ax.imshow(list(map(list, zip(*share))), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set(title=name, xlabel="validation (update)", ylabel="expert")
        ax.set_xticks(range(len(first)), [str(v["update"]) for v in first], rotation=90, fontsize="x-small")
        fig.colorbar(image, ax=ax, label="% of tokens")
    save_figure(fig, out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stablemoe-expert-load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="SAVE_DIR", help="a --save-dir of fairseq-train, or its expert_loads.json")
    parser.add_argument("--all", action="store_true", help="every validation, not only the last")
    parser.add_argument("--plot", metavar="PNG", help="write a per-layer heat map of the experts' shares")
    args = parser.parse_args(argv)
    quiet_logging()
    record = load_or_exit(load_expert_loads, args.path, parser.prog)
    if not record["validations"]:
        sys.exit(f"{args.path}: no validation recorded yet")
    print(report(record, args.all))
    if args.plot:
        plot(record, args.plot)


if __name__ == "__main__":
    main()
