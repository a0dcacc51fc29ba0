"""The whole GPU check of issue 16 in one run (one GPU, at most 8 minutes), writing one results file.

    python3 benchmarks/gpu_check.py --out gpu-results            # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry      # on CPU: every step starts, in about a minute

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is recorded, and the
next one runs):
  environment  torch, the GPU, whether torch._grouped_mm runs in bfloat16 there, fairseq's version
  cuda-tests   pytest -m cuda tests/test_cuda.py (fp16, memory-efficient fp16, --amp and bf16 training through the
               stage switch; routing in float32; incremental decoding; grouped vs loop experts in bf16)
  layer        benchmarks/layer.py, bf16, CUDA events: N 8/32/64 x 8K/32K tokens, d 1024; grouped vs loop experts
               against the dense FFN and the floor
  memory       benchmarks/memory.py: peak memory (max_memory_allocated) of one layer step, N 32, 8K tokens, d 1024
  train        benchmarks/train.py: fairseq-train words/s of stablemoe_lm (stage 1, stage 2) against the dense
               control, stablemoe_lm_base's blocks, fp16, a synthetic corpus
Results: <out>/results.md (each step's command, status, time and output) and <out>/results.json.

A GPU machine without fairseq: put wheels in .whl (benchmarks/gpu_wheels.sh, run where pip can download) and
pass --wheels .whl; they are installed into a temporary folder on the path first.
--dry-run runs every step on CPU at toy sizes: it checks imports, argument parsing, shapes and one step of each.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

ENVIRONMENT = """
import json, torch
from fairseq_stablemoe.moe.experts import grouped_mm_works
import fairseq
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "fairseq": fairseq.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
    "grouped_mm_bf16": grouped_mm_works("cuda" if cuda else "cpu", torch.bfloat16),
    "grouped_mm_fp16": grouped_mm_works("cuda" if cuda else "cpu", torch.float16),
    "grouped_mm_fp32": grouped_mm_works("cuda" if cuda else "cpu", torch.float32),
}))
"""


def steps(dry_run: bool, workdir: str):
    """(name, command, extra environment, time limit in seconds)."""
    if dry_run:  # limits for a loaded 2-core machine; about 45 CPU-seconds in all
        return [
            ("environment", [PY, "-c", ENVIRONMENT], {}, 300),
            ("cuda-tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py",
                            "-k", "grouped and one-expert and bf16-weights"], {"STABLEMOE_TEST_DEVICE": "cpu"}, 300),
            ("layer", [PY, "benchmarks/layer.py", "--device", "cpu", "--dtype", "bfloat16", "--experts", "4",
                       "--tokens", "256", "--dims", "64", "--routing", "balanced", "--pairs", "1", "--warmup", "0"],
             {}, 300),
            ("memory", [PY, "benchmarks/memory.py", "--device", "cpu", "--experts", "4", "--tokens", "256",
                        "--dims", "64", "--stages", "2"], {}, 300),  # three processes: dense, layer, this
            ("train", [PY, "benchmarks/train.py", "--device", "cpu", "--synthetic", "--lines", "40",
                       "--vocab", "200", "--routings", "stablemoe", "dense", "--stablemoe-stages", "2",
                       "--repeats", "1", "--max-update", "3",
                       "--log-interval", "1", "--tokens-per-sample", "32", "--batch-size", "2", "--experts", "2",
                       "--sublayers", "1", "--workdir", os.path.join(workdir, "train")], {}, 300),
        ]
    return [
        ("environment", [PY, "-c", ENVIRONMENT], {}, 60),
        ("cuda-tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"],
         {}, 210),
        ("layer", [PY, "benchmarks/layer.py", "--device", "cuda", "--dtype", "bfloat16", "--experts", "8", "32", "64",
                   "--tokens", "8192", "32768", "--dims", "1024", "--routing", "balanced", "--pairs", "5",
                   "--warmup", "2", "--threads", "16"], {}, 150),
        ("memory", [PY, "benchmarks/memory.py", "--device", "cuda", "--experts", "32", "--tokens", "8192",
                    "--dims", "1024", "--threads", "16"], {}, 45),
        ("train", [PY, "benchmarks/train.py", "--device", "cuda", "--precision", "fp16", "--shape", "base",
                   "--synthetic", "--lines", "4000", "--routings", "stablemoe", "dense", "--repeats", "1",
                   "--experts", "32", "--sublayers", "3", "--tokens-per-sample", "1024", "--batch-size", "8",
                   "--max-update", "40", "--log-interval", "10", "--threads", "4",
                   "--workdir", os.path.join(workdir, "train")], {}, 120),
    ]


def install_wheels(folder: str) -> str:
    """pip-install the wheels in `folder` into a temporary target; returns it (for PYTHONPATH)."""
    target = tempfile.mkdtemp(prefix="stablemoe-site-")
    wheels = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".whl"))
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--target", target, *wheels], check=True)
    return target


def run_step(name, cmd, extra_env, limit, env):
    start = time.time()
    # a session of its own: on timeout the step's own subprocesses (fairseq-train, memory.py's) are stopped too
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # layer.py prints its complete rounds on SIGTERM
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        status = f"out of time ({limit} s)"
    seconds = time.time() - start
    print(f"# {name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "command": " ".join(cmd), "status": status, "seconds": round(seconds, 1),
            "output": output}


def write_results(out, results, dry_run, total):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"dry_run": dry_run, "seconds": round(total, 1), "steps": results}, f, indent=1)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# GPU check{' (dry run on CPU)' if dry_run else ''}, {when}",
             "", f"Total {total:.0f} s.", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['name']}", "", f"`{r['command']}`", "", "```", keep_tables(r["output"]), "```"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def keep_tables(output: str, tail: int = 60) -> str:
    """A step's output for the report: its table and comment lines, and the end of the rest."""
    lines = output.splitlines()
    kept = [line for line in lines if line.startswith(("|", "# ", "{"))]
    rest = [line for line in lines if line not in kept]
    return "\n".join(kept + (["..."] if len(rest) > tail else []) + rest[-tail:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.md and results.json (created)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: check that every step starts")
    p.add_argument("--wheels", help="a folder of wheels to install first (fairseq and its needs, for a bare GPU box)")
    p.add_argument("--only", nargs="+", help="run only these steps")
    args = p.parse_args(argv)
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    if args.wheels:
        env["PYTHONPATH"] += os.pathsep + install_wheels(args.wheels)
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        chosen = [s for s in steps(args.dry_run, workdir) if not args.only or s[0] in args.only]
        if args.dry_run:  # toy steps on one thread each: side by side
            with ThreadPoolExecutor(len(chosen)) as pool:
                results = list(pool.map(lambda s: run_step(*s, env), chosen))
        for step in ([] if args.dry_run else chosen):  # on the GPU one at a time: each times its own runs
            results.append(run_step(*step, env))
            write_results(args.out, results, args.dry_run, time.time() - start)  # a killed run keeps its steps
        write_results(args.out, results, args.dry_run, time.time() - start)
    print(f"# results: {os.path.join(args.out, 'results.md')} ({time.time() - start:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
