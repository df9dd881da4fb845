# `make demo` and `make test` are the two commands of the README; both create .venv when it is missing.
# make demo [DEMO_DIR=DIR] [DEMO_WEIGHTS=imagenet|none|FILE.h5]: the drawn dataset goes to DIR/data and the run to
# DIR/run_<weights> (run_scratch when ImageNet weights cannot be had), with its report/metrics.json; demos with
# other weights in the same DIR get their own run folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_WEIGHTS ?= imagenet

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m trainer.demo --workdir=$(DEMO_DIR) --weights=$(DEMO_WEIGHTS)

# The tests run on every core (pytest-xdist; at most 4 processes: each holds TensorFlow and a few tiny models, ~1.5
# GB). The tests marked slow (multi-process fault runs, benches that run the trainer twice) run with test-all.
TEST_PROCESSES := -n auto --maxprocesses=4

test: setup
	$(PY) -m pytest $(TEST_PROCESSES) -m "not slow"

test-all: setup
	$(PY) -m pytest $(TEST_PROCESSES)

clean:
	rm -rf $(VENV) runs *.egg-info
