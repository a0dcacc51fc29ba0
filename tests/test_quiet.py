"""fairseq's CLIs print a screen of hydra/torch deprecation warnings on every start; the plugin filters exactly
those, and nothing else."""
import subprocess
import sys

import pytest

from helpers import PLUGIN, ROOT

SCRIPT = f"""
import warnings, sys
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
args = options.parse_args_and_arch(options.get_training_parser(), [
    "data", "--user-dir", {PLUGIN!r}, "--task", "stablemoe_language_modeling", "--arch", "stablemoe_lm_tiny"])
convert_namespace_to_omegaconf(args)  # fairseq's hydra compose: deprecated hydra APIs
next(iter(torch.utils.data.DataLoader([1], pin_memory=True)))  # as fairseq's loaders on a CPU
warnings.warn("a warning that matters")
"""


def run(**env):
    import os

    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow  # two subprocesses that import fairseq and compose its hydra config
def test_known_noise_is_filtered_and_other_warnings_show():
    shown = run()
    assert "a warning that matters" in shown
    assert "Warning" not in shown.replace("UserWarning: a warning that matters", ""), shown
    everything = run(STABLEMOE_ALL_WARNINGS="1")
    assert "no longer experimental" in everything and "pin_memory" in everything


def test_pytest_summary_leaves_out_the_known_noise_and_logs_every_warning(tmp_path):
    """pytest resets the warning filters per test, so `make test` ended with ~190 lines of the known noise."""
    import os

    (tmp_path / "test_w.py").write_text(
        "import warnings\n"
        "def test_noise():\n"
        "    warnings.warn('hydra.experimental.initialize() is no longer experimental. Use hydra.initialize()')\n"
        "def test_own():\n"
        "    warnings.warn('a warning that matters')\n")

    def pytest(**env):
        tests = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "test_w.py"], cwd=tmp_path,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": tests, "STABLEMOE_ALL_WARNINGS": "", **env}).stdout

    shown = pytest()
    assert "a warning that matters" in shown and "no longer experimental" not in shown, shown
    assert "\n1 known warning(s) of fairseq's calls into hydra and torch not shown" in shown
    assert "2 passed, 1 warning" in shown
    log = (tmp_path / ".pytest_cache" / "warnings.log").read_text()
    assert "test_w.py::test_noise" in log and "no longer experimental" in log and "a warning that matters" in log
    assert "no longer experimental" in pytest(STABLEMOE_ALL_WARNINGS="1")
