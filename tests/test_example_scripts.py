"""Small promises of the example scripts a newcomer runs first: what they print and when they refuse."""
import os
import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "multilingual_translation"))


def test_bleu_md_ends_with_a_newline_so_printed_tables_do_not_run_together():
    from evaluate import bleu_markdown

    text = bleu_markdown([("X→En", {"de": 1.234, "fr": 2.0})], "StableMoE", "nrefs:1|case:mixed")
    assert text == ("| X→En | de | fr | Avg |\n|---|---|---|---|\n| StableMoE | 1.23 | 2.00 | 1.62 |\n\n"
                    "sacreBLEU signature: `nrefs:1|case:mixed`\n")


def test_fluctuation_run_sh_names_the_command_when_SOTU_has_no_text(tmp_path):
    script = os.path.join(ROOT, "examples", "fluctuation", "run.sh")
    proc = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, SOTU=str(tmp_path / "nowhere"), OUT=str(tmp_path / "out")))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"SOTU={tmp_path}/nowhere has no train.txt and valid.txt; fetch them with: "
                           f"python {ROOT}/examples/demo/prepare_sotu.py {tmp_path}/nowhere\n")


def demo_train_call(tmp_path, **env):
    """examples/demo/run.sh up to fairseq-train, with the data in place and a fairseq-train that records how it was
    called (its environment's thread count and its arguments) and fails."""
    demo = tmp_path / "demo"
    for path in ("text/train.txt", "spm.model", "bin/dict.txt"):
        (demo / path).parent.mkdir(parents=True, exist_ok=True)
        (demo / path).write_text("x\n")
    fake = tmp_path / "bin" / "fairseq-train"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "threads=$OMP_NUM_THREADS $*" > {tmp_path}/call.txt\nexit 1\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "demo", "run.sh")], capture_output=True, text=True,
                          env={**clean, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
                               "DEMO_DIR": str(demo), **env})
    assert proc.returncode == 1 and "fairseq-train failed" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout.splitlines()[0], (tmp_path / "call.txt").read_text()


def test_demo_runs_one_thread_unless_the_user_sets_omp_num_threads(tmp_path):
    first, call = demo_train_call(tmp_path)
    assert first == f"make demo: 500 updates, 1 thread(s) per process (OMP_NUM_THREADS), writing to {tmp_path}/demo/"
    assert call.startswith("threads=1 ")
    first, call = demo_train_call(tmp_path / "own", OMP_NUM_THREADS="2", DEMO_UPDATES="100")
    assert first.startswith("make demo: 100 updates, 2 thread(s)") and call.startswith("threads=2 ")


def test_demo_records_routing_probes_for_the_analysis_commands(tmp_path):
    _, call = demo_train_call(tmp_path)
    assert " --routing-probe-interval 50 --routing-probe-tokens 4096 " in call
