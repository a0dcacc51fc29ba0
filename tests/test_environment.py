"""The environment checks `make install` runs and the plugin logs on import."""
import subprocess
import sys

import pytest

from fairseq_stablemoe import environment
from helpers import ROOT


def test_installed_environment_has_no_known_problem():
    # numpy < 2 (fairseq's np.compat) and a libbase built against this torch: what `make install` sets up
    proc = subprocess.run([sys.executable, "-c", "import fairseq_stablemoe.environment as e; e.main()"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "environment ok" in proc.stdout and "fairseq.libbase loads" in proc.stdout


def test_libbase_built_against_another_torch_says_how_to_rebuild(monkeypatch):
    def broken(name):
        raise ImportError(f"/venv/lib/python3.11/site-packages/fairseq/libbase.cpython-311-x86_64-linux-gnu.so: "
                          f"undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

    monkeypatch.setattr(environment.importlib, "import_module", broken)
    problem = environment.libbase_problem()
    assert "built against another torch" in problem and "undefined symbol" in problem
    assert "--no-build-isolation --no-cache-dir" in problem


def test_libbase_not_built_is_not_a_problem_here(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'fairseq.libbase'")

    monkeypatch.setattr(environment.importlib, "import_module", missing)
    assert environment.libbase_problem() == ""  # --moe-routing base says so itself when used


def test_numpy_without_compat_is_reported(monkeypatch):
    import numpy

    monkeypatch.delattr(numpy, "compat", raising=False)
    assert "numpy<2" in environment.numpy_problem()


def test_docs_errors_rows_show_the_exact_messages(monkeypatch, caplog):
    import numpy

    from fairseq_stablemoe.hub import check_languages
    from test_errors import doc_messages

    rows = doc_messages()
    monkeypatch.delattr(numpy, "compat", raising=False)
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert rows["numpy-2"] == environment.numpy_problem()
    with pytest.raises(ValueError) as e:
        check_languages({}, ["xx", "en"])
    assert rows["hub-direction"] == str(e.value)
