"""The CPU benchmarks that benchmarks/README.md quotes run at toy sizes and print complete tables (gpu_check's dry run
covers layer.py's default implementations, memory.py and train.py)."""
import os
import subprocess
import sys

from helpers import ROOT


def table_rows(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("| ").split("|")] for line in lines[1:]]  # without the header


def test_weights_prints_hot_and_cold_products_for_each_row_count():
    rows = table_rows("weights.py", "--experts", "3", "--rows", "4", "8", "--dims", "16", "--rounds", "2")
    assert [(r[0], r[3]) for r in rows] == [("4", "input"), ("4", "weight grad"), ("8", "input"),
                                            ("8", "weight grad")]
    for r in rows:
        assert r[1:3] == ["16", "64"] and float(r[6]) > 0


def test_layer_times_the_one_module_per_expert_reference_beside_the_bank():
    rows = table_rows("layer.py", "--experts", "4", "--tokens", "256", "--dims", "64", "--routing", "skewed",
                      "--pairs", "1", "--warmup", "0", "--experts-impl", "loop", "modules")
    assert [r[4] for r in rows] == ["loop", "modules"]
    assert all(float(cell) > 0 for r in rows for cell in r[7:])
