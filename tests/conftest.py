import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's plugin, whatever is installed


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs fairseq-train or another CLI end to end (minutes); "
                                       "`make test-fast` leaves these out")
    config.addinivalue_line("markers", "distributed: starts several processes that talk over gloo")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); `pytest -m cuda` runs them")
