# dreamlook-batch: every target works on a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install demo test lint bench bench-quick chaos mutants clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres,s3]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev tools

demo: $(STAMP)  ## run jobs/example.yaml against the built-in simulator, then write its report
	$(BIN)/dreamlook-batch run jobs/example.yaml --simulate
	$(BIN)/dreamlook-batch report jobs/example.yaml --simulate
	@echo
	@echo "The demo ran against a simulator: its files are in jobs/outputs/example/, its state in"
	@echo "jobs/.dreamlook-batch/example.simulated.db (a run without --simulate never sees it). Look at it:"
	@echo "  $(BIN)/dreamlook-batch status jobs/example.yaml --simulate"
	@echo "  $(BIN)/dreamlook-batch report jobs/example.yaml --simulate   # jobs/outputs/example/report.html"

test: $(STAMP)  ## run the test suite
	$(BIN)/pytest -q

lint: $(STAMP)  ## ruff and mypy --strict, of the package, the tests and the benchmarks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check orchestrator tests bench
	$(BIN)/mypy
	$(BIN)/mypy tests bench

bench: $(STAMP)  ## measure speed and memory side by side with the baselines; writes bench/RESULTS.md
	$(BIN)/python -m bench

bench-quick: $(STAMP)  ## a smaller bench run (under 2 minutes)
	$(BIN)/python -m bench --quick

chaos: $(STAMP)  ## the long kill-and-restart chaos runs (one process, and six workers on PostgreSQL); figures in bench/chaos-results.json
	$(BIN)/pytest -q -s -m slow tests/test_chaos.py tests/test_chaos_workers.py

mutants: $(STAMP)  ## mutation testing of the code that guards money and files (long); survivors answered in bench/MUTANTS.md
	$(BIN)/pip install --quiet -e '.[dev,mutants]'
	$(BIN)/python -m bench.mutants

clean:  ## remove the environment, demo outputs and state
	rm -rf $(VENV) mutants jobs/outputs jobs/.dreamlook-batch .pytest_cache .mypy_cache .ruff_cache
