"""Checks of the installed environment that would otherwise fail later and obscurely.

    python -c "import fairseq_stablemoe.environment as e; e.main()"   # exit 1 on a problem; make install runs it

On import the plugin logs the same findings as warnings.
"""
import importlib
import importlib.util
import logging
import sys
from typing import List

logger = logging.getLogger(__name__)

REBUILD_FAIRSEQ = (
    "pip uninstall -y fairseq-fixed && pip install --no-build-isolation --no-cache-dir --no-deps "
    "fairseq-fixed==0.12.3.1 (with the torch you train with already installed)")


class EnvironmentProblem(Exception):
    pass


def check_libbase():
    """Nothing if fairseq's C++ extension libbase loads (or simply was not built); else why it does not."""
    try:
        importlib.import_module("fairseq.libbase")
    except ImportError as e:
        text = str(e)
        if "undefined symbol" in text or "cannot open shared object" in text:
            import torch

            raise EnvironmentProblem(
                f"fairseq's C++ extension fairseq.libbase was built against another torch than this one "
                f"({torch.__version__}): {text.splitlines()[0][:160]}. --moe-routing base needs it; rebuild "
                f"fairseq against this torch (pip may reuse a cached wheel built against the old one, hence "
                f"--no-cache-dir): {REBUILD_FAIRSEQ}")


def check_numpy():
    import numpy

    if not hasattr(numpy, "compat"):
        raise EnvironmentProblem(
            f"numpy {numpy.__version__} has no numpy.compat, which fairseq's TokenBlockDataset uses: "
            f"--sample-break-mode eos/complete (fairseq-train, fairseq-eval-lm) and the hub's score()/sample() fail; "
            f"install numpy<2 (pip install 'numpy<2'; fairseq-stablemoe declares it)")


def _problem(check) -> str:
    try:
        check()
    except EnvironmentProblem as problem:
        return str(problem)
    return ""


def numpy_problem() -> str:
    return _problem(check_numpy)


def libbase_problem() -> str:
    """'' if fairseq's C++ extension libbase loads (or simply was not built); else why it does not."""
    return _problem(check_libbase)


def problems() -> List[str]:
    return [p for p in (numpy_problem(), libbase_problem()) if p]


def warn_on_import():
    for problem in problems():
        logger.log(logging.WARNING, problem)  # the texts are raised (and listed in docs/errors.md) above


def main():
    found = problems()
    for problem in found:
        print(f"fairseq-stablemoe: {problem}", file=sys.stderr)
    if not found:
        import fairseq
        import numpy
        import torch

        built = importlib.util.find_spec("fairseq.libbase") is not None
        print(f"fairseq-stablemoe: environment ok (torch {torch.__version__}, fairseq {fairseq.__version__}, "
              f"numpy {numpy.__version__}; fairseq.libbase {'loads' if built else 'not built: no --moe-routing base'})")
    if found:
        sys.exit(1)
