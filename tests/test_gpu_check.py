"""benchmarks/gpu_check.py --dry-run: every step of the GPU check starts and runs at toy sizes on CPU, so the one
short run a GPU allows does not fail on an import, a flag or a shape."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow  # every step's subprocess, training included
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    results = json.loads((out / "results.json").read_text())
    steps = {step["name"]: step for step in results["steps"]}
    assert list(steps) == ["environment", "cuda-tests", "layer", "memory", "train"]
    for name, step in steps.items():
        assert step["status"] == "ok", f"{name}: {step['status']}\n{step['output'][-3000:]}"
    assert proc.returncode == 0
    environment = json.loads(steps["environment"]["output"].strip().splitlines()[-1])
    assert environment["device"] == "cpu" and "grouped_mm_bf16" in environment
    assert "1 passed" in steps["cuda-tests"]["output"]
    layer = steps["layer"]["output"]
    assert "torch.bfloat16" in layer and "| 4 | 256 | 64 | balanced | loop |" in layer
    assert "| 4 | 256 | 64 | balanced | 2 |" in steps["memory"]["output"]
    assert "| stablemoe S2 |" in steps["train"]["output"] and "| dense |" in steps["train"]["output"]
    report = (out / "results.md").read_text()
    assert "| train | ok |" in report and "## layer" in report
