# The two set-up commands of the README (`make demo`, `make test`), plus the developer targets. Every
# target creates or refreshes the virtual environment at .venv (re-installed only when pyproject.toml
# changes), so each works on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
RUFF := $(VENV)/bin/ruff

.PHONY: demo test test-fast lint format venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; the project needs Python 3.11 or 3.12 (set PYTHON=...)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py

# The full suite: what CI runs.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=30

# The tier to run while editing (under 90 s on 2 cores): every package, without the multi-process
# training runs, the demo, the Slurm job and the other tests marked `slow`.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(RUFF) format --check .
	$(RUFF) check .

format: $(STAMP)
	$(RUFF) format .
	$(RUFF) check --fix .

clean-venv:
	rm -rf $(VENV)
