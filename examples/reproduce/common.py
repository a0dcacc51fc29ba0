"""What every reproduction entry point shares: the command line, cached and locked results, a job pool, tables.

A result is a JSON file written once its run is complete; an interrupted entry point re-run skips what is done
and resumes what is not (fairseq-train restarts from the run's checkpoint_last.pt). Entry points may run at
the same time: a run is locked while it trains, so two tables needing it train it once.
"""
import argparse
import fcntl
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLUGIN = os.path.join(ROOT, "fairseq_stablemoe")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging set-up lets its font search through


def parser(doc: str, default_data: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a minutes-long smoke run: tiny data, model and budget")
    mode.add_argument("--long", action="store_true",
                      help="10x the updates of the default mode on a smaller model and vocabulary, so that "
                           "StableMoE's stage 1 can learn a routing (where the entry point has a long mode)")
    mode.add_argument("--medium", action="store_true",
                      help="LM entry points: a 16x larger model than --long's (4 blocks of 128, 16 x 128 tokens "
                           "per update, 3,000 updates; about 25 min a run on one idle core), seeds 1-2")
    p.add_argument("--data", default=default_data, help=f"the corpus (default {default_data})")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "reproduce"),
                   help="results folder; runs are shared between entry points that use the same --out")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time, one CPU thread each")
    p.add_argument("--finished", action="store_true",
                   help="table2.py: write the table from the runs already finished (e.g. while the rest train)")
    return p


def slug(name: str) -> str:
    """A row name as a folder name: "BASE Layer" -> "base-layer"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def mode(args) -> str:
    if args.quick:
        return "quick"
    return "long" if getattr(args, "long", False) else "medium" if getattr(args, "medium", False) else "full"


def out_dir(args) -> str:
    path = os.path.join(args.out, mode(args))
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(path: str, compute):
    """The JSON at `path`, computed (under a lock) and written atomically if missing."""
    with locked(path):
        if not os.path.exists(path):
            value = compute()
            with open(path + ".tmp", "w") as f:
                json.dump(value, f, indent=1)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            return json.load(f)


def run_logged(cmd, log_path: str, threads: int = 1, append: bool = True) -> str:
    """Run a command with its output appended to log_path; fail with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.time()
    with open(log_path, "a" if append else "w") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        log.flush()
        code = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    with open(log_path) as f:
        text = f.read()
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}) after {time.time() - start:.0f} s; see {log_path}:\n"
                           + text[-3000:])
    return text


def fairseq_cli(name: str) -> list:
    """fairseq's console script through this interpreter, so the venv's fairseq runs without PATH set-up."""
    return [sys.executable, "-m", f"fairseq_cli.{name}"]


def run_all(tasks, jobs: int):
    """Call every task (a no-argument function) with `jobs` at a time; return their results in order."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda task: task(), tasks))


def mean_std(values, digits=2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def write_report(path: str, text: str):
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    print(text)
    print(f"\nwrote {path}")


def require_data(path: str, what: str, files):
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
        sys.exit(f"--data {path}: {what} needs {', '.join(missing)} there; pass --data with a folder that has them")
