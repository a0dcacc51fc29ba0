"""The analysis and reshard tools as console commands (setup.py's entry points) and `python -m` modules."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


def console_scripts():
    text = open(os.path.join(ROOT, "setup.py")).read()
    return re.findall(r'"(stablemoe-[\w-]+) = ([\w.]+):(\w+)"', text)


def test_every_tool_has_a_console_script():
    assert {name for name, _, _ in console_scripts()} == {
        "stablemoe-fluctuation", "stablemoe-expert-tokens", "stablemoe-expert-load", "stablemoe-reshard-checkpoint"}


@pytest.mark.parametrize("name, module, function", console_scripts())
def test_help_shows_the_common_use(name, module, function, capsys):
    with pytest.raises(SystemExit) as done:
        getattr(importlib.import_module(module), function)(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {name} ")
    # an example command line, and the `python -m` form that keeps working
    assert re.search(rf"^\s+{name} \S", text, re.M) and f"python -m {module}" in text


@pytest.mark.parametrize("name, module, function", console_scripts())
def test_installed_commands_run(name, module, function):
    """Each installed command, run: a wrong module or function in setup.py's entry point, or a tool that fails on
    import, fails here."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(script), f"{name} is not installed: pip install -e . (make install does)"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:2000]


@pytest.mark.parametrize("name, module, function", console_scripts())
def test_python_m_runs_without_a_runpy_warning(name, module, function):
    """The package's import must not import the tools' modules: `python -m` then warns 'found in sys.modules'."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name}"), proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]
