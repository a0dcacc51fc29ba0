"""fairseq's CLIs print a screen of hydra/torch deprecation warnings on every start; the plugin filters exactly
those, and nothing else."""
import subprocess
import sys

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


def test_known_noise_is_filtered_and_other_warnings_show():
    shown = run()
    assert "a warning that matters" in shown
    assert "Warning" not in shown.replace("UserWarning: a warning that matters", ""), shown
    everything = run(STABLEMOE_ALL_WARNINGS="1")
    assert "no longer experimental" in everything and "pin_memory" in everything
