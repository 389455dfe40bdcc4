# Set-up and entry points. `make demo` and `make test` work on a fresh clone (they create .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

.PHONY: install demo smoke lint test serve-demo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Main job on the bundled real data: train (regime, signals, PPO), evaluate on the held-out test period,
## then replay the test period through the paper-serving loop with the exported bundle.
demo: install
	$(BIN)/ats train --config configs/demo.yaml --out $(RUN_DIR)
	$(BIN)/ats serve --mode paper --replay $(RUN_DIR)/replay/test_candles.parquet --bundle $(RUN_DIR)/bundle --db $(RUN_DIR)/serve_state.sqlite --max-bars 1000

smoke: install
	$(BIN)/ats train --config configs/smoke.yaml --out runs/smoke

## ruff (rules in pyproject.toml [tool.ruff.lint]) on everything, mypy ([tool.mypy]: the product packages)
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install
	PYTHONHASHSEED=0 $(BIN)/pytest -q

clean:
	rm -rf runs .pytest_cache
