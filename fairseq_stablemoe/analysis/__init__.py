"""Command-line analyses of trained models and routing records (paper §1.1 Figs. 2 and 7, Table 9)."""
import logging
import sys


def quiet_logging():
    """Importing fairseq's text_to_speech task sets the root logger to DEBUG; our tools print their own report."""
    logging.getLogger().setLevel(logging.WARNING)


def load_or_exit(load, path: str, prog: str):
    """`load(path)`, or exit with one line (the record is missing or of another version) instead of a traceback."""
    try:
        return load(path)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"{prog}: {err}")


def pyplot():
    """matplotlib's pyplot drawing into files (no screen needed), or exit naming the package to install."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib (or pip install 'fairseq-stablemoe[plots]')")
    matplotlib.use("Agg")
    # with the root logger at DEBUG (fairseq's import of its text_to_speech task sets it), matplotlib logs
    # every font it scores: hundreds of lines. Its own warnings still show.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str):
    import os

    from ..atomic import atomic_open

    fig.tight_layout()
    with atomic_open(out) as f:  # a temporary file and a rename, as every file the plugin writes
        fig.savefig(f, dpi=120, format=os.path.splitext(out)[1][1:] or "png")
    print(f"wrote {out}")
