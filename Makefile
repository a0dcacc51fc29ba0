# `make test` and `make demo` set everything up on a fresh machine (a virtualenv in .venv), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo install clean

install: $(STAMP)

# fairseq's C++ extensions must be built against the torch that runs them: torch first, then fairseq
# without build isolation; numpy < 2 because fairseq uses np.compat. The last step checks the result
# (numpy, and a fairseq.libbase that loads with this torch) and says how to rebuild if not.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" cython "numpy<2" setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,tensorboard,examples]"
	$(PY) -c "import fairseq_stablemoe.environment as e; e.main()"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -W ignore::DeprecationWarning -W ignore::FutureWarning tests

# the edit loop: everything but the end-to-end (slow) and multi-process (distributed) tests, a few minutes
test-fast: $(STAMP)
	$(PY) -m pytest -q -W ignore::DeprecationWarning -W ignore::FutureWarning -m "not slow and not distributed" tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo/run.sh

clean:
	rm -rf $(VENV) demo
