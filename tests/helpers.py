"""Shared test helpers: a tiny synthetic corpus and fairseq's CLIs run in-process (no 5 s start-up each)."""
import contextlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "fairseq_stablemoe")


def free_port() -> int:
    """A TCP port nobody listens on now, for --distributed-init-method tcp://127.0.0.1:PORT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dictionary(n=40):
    """A fairseq Dictionary of n words w0 ... (plus fairseq's 4 special symbols)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def write_corpus(directory, vocab=120, lines=(600, 60, 60), seed=0):
    """Zipf-ish random sentences in train/valid/test.txt; returns the directory."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]
    os.makedirs(directory, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines):
        with open(os.path.join(directory, f"{split}.txt"), "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choices(words, weights, k=rng.randint(4, 24))) + "\n")
    return directory


def run_cli(module, args, cwd=None):
    """Run a fairseq CLI in a fresh interpreter (fairseq's CLIs keep global state); return its output."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def preprocess_lm(text_dir, dest):
    run_cli("fairseq_cli.preprocess", [
        "--only-source", "--trainpref", f"{text_dir}/train.txt", "--validpref", f"{text_dir}/valid.txt",
        "--testpref", f"{text_dir}/test.txt", "--destdir", dest, "--workers", "1"])
    return dest


def train_lm_args(data, save_dir, *extra, stage1=10, max_update=20, seed=1):
    return [
        data, "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling", "--arch", "stablemoe_lm_tiny",
        "--criterion", "stablemoe_cross_entropy", "--stage1-updates", stage1, "--max-update", max_update,
        "--optimizer", "adam", "--lr", "3e-3", "--tokens-per-sample", 32, "--batch-size", 4,
        "--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
        "--decoder-attention-heads", 2, "--moe-experts", 4, "--moe-sublayers", 1,
        "--cpu", "--save-dir", save_dir, "--no-epoch-checkpoints", "--seed", seed,
        "--log-format", "simple", "--log-interval", 1, "--num-workers", 0, *extra,
    ]


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def build_lm(tmp_dir, *extra, vocab=50):
    """A stablemoe_lm built in-process from command-line flags (a dictionary of `vocab` words, no data)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    os.makedirs(tmp_dir, exist_ok=True)
    with open(os.path.join(tmp_dir, "dict.txt"), "w") as f:
        f.writelines(f"w{i} {1000 - i}\n" for i in range(vocab))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(tmp_dir), "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling", "--arch", "stablemoe_lm_tiny",
        "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", "2", "--moe-experts", "4", "--moe-sublayers", "1",
        "--tokens-per-sample", "32", *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)  # as fairseq-train does
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), task


WORDS = ["file", "open", "save", "the", "document", "menu", "click", "print", "page", "table", "insert", "cell",
         "text", "select", "format", "window", "help", "edit", "view", "tools", "close", "new", "chart", "sheet"]


def translate_word(word: str, lang: str) -> str:
    """A made-up language: a fixed, learnable rewrite of each English word."""
    return {"xx": word[::-1], "yy": word.upper() + "a"}[lang]


def write_parallel_corpus(root, langs=("xx", "yy"), sizes=(("train", 400), ("valid", 40), ("test", 20)),
                          seed=1):
    """`<xx>-en/{train,valid,test}.{xx,en}` for made-up languages whose sentences are word-by-word rewrites
    of random English ones (the layout examples/multilingual_translation takes)."""
    rng = random.Random(seed)
    root = Path(root)
    for lang in langs:
        pair = root / f"{lang}-en"
        pair.mkdir(parents=True, exist_ok=True)
        for split, n in sizes:
            en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
            (pair / f"{split}.en").write_text("\n".join(en) + "\n")
            (pair / f"{split}.{lang}").write_text(
                "\n".join(" ".join(translate_word(w, lang) for w in s.split()) for s in en) + "\n")
    return root


# --- in-process building and forked training (no interpreter start-up per run) ---

import logging  # noqa: E402
import multiprocessing  # noqa: E402

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared CPU the threads only contend.
torch.set_num_threads(1)


def tiny_lm_data(tmp_dir, vocab=40, lines=(200, 20, 20), name="bin"):
    """write_corpus + fairseq-preprocess, binarized in-process; returns the data directory."""
    from fairseq import options
    from fairseq_cli import preprocess

    text = write_corpus(os.path.join(str(tmp_dir), f"{name}-text"), vocab, lines)
    dest = os.path.join(str(tmp_dir), name)
    with quiet():
        preprocess.main(options.get_preprocessing_parser().parse_args([
            "--only-source", "--trainpref", f"{text}/train.txt", "--validpref", f"{text}/valid.txt",
            "--testpref", f"{text}/test.txt", "--destdir", dest, "--workers", "1"]))
    return dest


def stage2_began(model_state):
    """The update a saved model's (one) StableMoE routing began stage 2 at; None: it was saved in stage 1."""
    [began] = [v["stage2_began"] for k, v in model_state.items() if k.endswith("routing._extra_state")]
    return began


def saved_stage(model_state) -> int:
    return 1 if stage2_began(model_state) is None else 2


def same_state(a: dict, b: dict) -> bool:
    """Two model state dicts hold the same keys and bit-identical values (tensors, and extra states)."""
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k]
                                        for k, v in a.items())


def build_for_training(data, *extra, save_dir=None):
    """(cfg, task, model, criterion) exactly as fairseq-train builds them from train_lm_args + extra flags."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    save_dir = save_dir or os.path.join(data, "no-checkpoints")
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       list(map(str, train_lm_args(data, save_dir, *extra))))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return cfg, task, model, task.build_criterion(cfg.criterion)


def _fairseq_train_cli(argv, log_path):
    torch.set_num_threads(1)
    stream = open(log_path, "a", buffering=1)
    sys.stdout = sys.stderr = stream
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    from fairseq_cli import train

    sys.argv = ["fairseq-train", *map(str, argv)]
    train.cli_main()


def start_fairseq_train(argv, log_path):
    """`fairseq-train argv` in a forked process (torch and fairseq already imported), output to log_path.
    A real process of its own: it can be killed with SIGKILL."""
    process = multiprocessing.get_context("fork").Process(target=_fairseq_train_cli, args=(argv, log_path))
    process.start()
    return process


def run_fairseq_train(argv, log_path, timeout=120):
    """Run `fairseq-train argv` (forked) to the end; returns its log."""
    process = start_fairseq_train(argv, log_path)
    process.join(timeout)
    log = open(log_path).read()
    if process.exitcode != 0:
        process.kill()
        raise AssertionError(f"fairseq-train failed ({process.exitcode}):\n{log[-4000:]}")
    return log


def _fairseq_cli(module, argv, log_path):
    import importlib

    torch.set_num_threads(1)
    stream = open(log_path, "a", buffering=1)
    sys.stdout = sys.stderr = stream
    logging.getLogger().handlers = [logging.StreamHandler(stream)]
    logging.getLogger().setLevel(logging.INFO)
    sys.argv = [module, *map(str, argv)]
    cli = importlib.import_module(module)
    (cli.cli_main if hasattr(cli, "cli_main") else cli.main)()


def run_forked(module, argv, log_path, timeout=180):
    """`python -m module argv` (a fairseq CLI or one of ours) in a forked process; (exit code, log)."""
    process = multiprocessing.get_context("fork").Process(target=_fairseq_cli, args=(module, argv, log_path))
    process.start()
    process.join(timeout)
    return process.exitcode, open(log_path).read()


def trained_tiny_lm(tmp, stage1=2, max_update=3):
    """tiny_lm_data in `tmp`, and fairseq-train for a few updates (through the switch) into tmp/ckpt:
    (data, save_dir)."""
    data = tiny_lm_data(tmp)
    save_dir = str(tmp / "ckpt")
    run_fairseq_train(train_lm_args(data, save_dir, stage1=stage1, max_update=max_update), str(tmp / "train.log"))
    return data, save_dir


DISTRIBUTED = ["--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def launch(module, args, world, log_prefix):
    """Start `world` processes of a fairseq CLI (the manual gloo launch); returns (process, log path)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    port, started = free_port(), []
    for rank in range(world):
        extra = [] if world == 1 else DISTRIBUTED + [
            "--distributed-world-size", str(world), "--distributed-rank", str(rank),
            "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        log = f"{log_prefix}-rank{rank}.log"
        with open(log, "w") as out:
            started.append((subprocess.Popen([sys.executable, "-m", module] + args + extra, stdout=out,
                                             stderr=subprocess.STDOUT, env=env), log))
    return started


def wait(started):
    logs = []
    for process, log in started:
        rc = process.wait(timeout=600)
        text = open(log).read()
        assert rc == 0, f"{log} exited with {rc}:\n{text[-4000:]}"
        logs.append(text)
    return logs
