# The two set-up commands of the README. Both create or refresh the virtual environment at .venv
# (re-installed only when pyproject.toml changes), so each works on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; the project needs Python 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
