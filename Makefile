# The two set-up commands of the README: `make demo` and `make test`; `make bench` for the benchmarks.
# Both create the project-local virtual environment .venv on their own.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, with its exact pin: an unpinned resolve pulls the CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fleetmerge demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ''

# The performance benchmarks, each with its defaults (the Beetle quality ones, quality_beetle and
# build_beetle_fleet, need ../shared data and hours: run them by hand). `extract` reads the Beetle
# answers from ../shared too. Each prints one JSON object as its last line; the lines are repeated
# at the end. Choose others with `make bench BENCHES="gw_solvers gw_matrix"`.
BENCHES ?= gw_solvers gw_matrix extract merge serve e2e

bench: SHELL := /bin/bash
bench: $(STAMP)
	@set -eo pipefail; logs=$$(mktemp -d); trap 'rm -rf "$$logs"' EXIT; \
	for name in $(BENCHES); do \
		echo "== bench/$$name.py"; \
		$(VENV)/bin/python -m bench.$$name | tee "$$logs/$$name.out"; \
	done; \
	echo "== results"; \
	for name in $(BENCHES); do printf '%s: ' "$$name"; tail -n 1 "$$logs/$$name.out"; done

clean:
	rm -rf $(VENV) .fleetmerge
