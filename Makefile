# Every target does its own set-up on a fresh machine: a virtualenv in .venv with the package installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/stdlib
# Leave one core's worth of slack for XLA's own threads on small machines.
PYTEST_WORKERS ?= 2

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The compiled CPU decode kernels (docs/kernels.md): rebuilt when their sources or jaxlib change; a
# machine without a C++ compiler gets a message and decodes with the pure-JAX path.
install: $(VENV)/.installed
	-@$(PY) -m scaling_sparse.kernels.build --quiet

# Train the stdlib demo model on the embedded corpus (no download), then sample from it.
demo: install
	$(PY) -m scaling_sparse train --config=experiments/configs/stdlib.py --workdir=$(WORKDIR)
	$(PY) -m scaling_sparse generate --config=experiments/configs/stdlib.py --workdir=$(WORKDIR) \
	  --prompt="def main(" --max_new_tokens=64

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 tests

bench: install
	$(PY) benchmarks/decode_latency.py

clean:
	rm -rf $(VENV) workdirs
