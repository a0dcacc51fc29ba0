"""Shared test helpers: a tiny synthetic corpus, binarized in-process, and tiny models built from flags."""
import logging
import multiprocessing
import os
import random
import sys
from typing import List, Optional

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

# Tiny models gain nothing from intra-op threads, and on a shared CPU the threads only contend.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "fairseq_stablemoe")

# A model small enough that a CPU update takes milliseconds; the flags a user would pass.
TINY_LM = [
    "--arch", "stablemoe_lm_tiny", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-layers", "2", "--decoder-attention-heads", "2", "--moe-experts", "4", "--moe-sublayers", "1",
    "--distilled-dim", "8", "--tokens-per-sample", "32",
]


def write_corpus(directory: str, vocab: int = 40, lines: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", lines), ("valid", max(8, lines // 10))):
        with open(os.path.join(directory, f"{split}.txt"), "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + "\n")


def binarize(text_dir: str, dest: str, srcdict: Optional[str] = None) -> str:
    """fairseq-preprocess --only-source, in-process (saves the CLI's start-up time)."""
    from fairseq_cli import preprocess

    argv = ["--only-source", "--trainpref", os.path.join(text_dir, "train.txt"),
            "--validpref", os.path.join(text_dir, "valid.txt"), "--destdir", dest, "--workers", "1"]
    if srcdict:
        argv += ["--srcdict", srcdict]
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    return dest


def tiny_corpus(tmp_path, vocab: int = 40, lines: int = 200, name: str = "bin") -> str:
    text = os.path.join(str(tmp_path), f"{name}-text")
    write_corpus(text, vocab, lines)
    return binarize(text, os.path.join(str(tmp_path), name))


def train_args(data: str, *extra: str) -> List[str]:
    return [data, "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling",
            "--criterion", "stablemoe_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
            "--batch-size", "4", "--cpu", "--seed", "1", *TINY_LM, *extra]


def train_cfg(data: str, *extra: str):
    """The config fairseq-train makes of these flags."""
    args = options.parse_args_and_arch(options.get_training_parser(), train_args(data, *extra))
    return convert_namespace_to_omegaconf(args)


def build(data: str, *extra: str):
    """(cfg, task, model, criterion) exactly as fairseq-train builds them from these flags."""
    cfg = train_cfg(data, *extra)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def _fairseq_train_cli(argv, log_path):
    torch.set_num_threads(1)
    stream = open(log_path, "a", buffering=1)
    sys.stdout = sys.stderr = stream
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    from fairseq_cli import train

    sys.argv = ["fairseq-train", *argv]
    train.cli_main()


def start_fairseq_train(argv: List[str], log_path: str) -> multiprocessing.Process:
    """`fairseq-train argv` in a forked process (no second import of torch and fairseq), output to log_path."""
    process = multiprocessing.get_context("fork").Process(target=_fairseq_train_cli, args=(argv, log_path))
    process.start()
    return process


def run_fairseq_train(argv: List[str], log_path: str, timeout: float = 120) -> str:
    """Run `fairseq-train argv` to the end; returns its log."""
    process = start_fairseq_train(argv, log_path)
    process.join(timeout)
    log = open(log_path).read()
    if process.exitcode != 0:
        process.kill()
        raise AssertionError(f"fairseq-train failed ({process.exitcode}):\n{log[-4000:]}")
    return log
