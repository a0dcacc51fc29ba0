import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's plugin, whatever is installed
WARNINGS_LOG = os.path.join(".pytest_cache", "warnings.log")


def known_noise():
    """fairseq_stablemoe/quiet.py's list: the hydra and torch deprecation warnings that fairseq's own calls raise
    (read alone: importing the package would import fairseq before the tests do)."""
    spec = importlib.util.spec_from_file_location("_stablemoe_quiet", os.path.join(ROOT, "fairseq_stablemoe", "quiet.py"))
    quiet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quiet)
    return [re.compile(rf"\b{category.__name__}: {message}") for category, message in quiet.NOISE]


def pytest_sessionfinish(session):
    """The plugin filters fairseq's known warning noise when it is imported, but pytest resets the warning filters
    for every test, so they came back as a summary of ~190 lines. Every warning goes to .pytest_cache/warnings.log;
    the summary on screen leaves out the known noise and says how many it left out (STABLEMOE_ALL_WARNINGS=1: all)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reports = reporter.stats.get("warnings", []) if reporter else []
    if not reports:
        return
    path = os.path.join(session.config.rootpath, WARNINGS_LOG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as log:
        for report in reports:
            log.write(f"{report.nodeid or '(collection)'}\n{report.message.rstrip()}\n\n")
    if os.environ.get("STABLEMOE_ALL_WARNINGS"):
        return
    noise = known_noise()
    shown = [r for r in reports if not any(pattern.search(r.message) for pattern in noise)]
    if len(shown) < len(reports):
        reporter.write(f"\n{len(reports) - len(shown)} known warning(s) of fairseq's calls into hydra and torch not "
                       f"shown (fairseq_stablemoe/quiet.py lists them); every warning: {WARNINGS_LOG}\n")
        reporter.stats["warnings"] = shown
        if not shown:
            del reporter.stats["warnings"]
