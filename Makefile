# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: offline, so it runs on random weights unless the weights are in the local HF cache.
demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/pathsurgeon add --model vit_base_patch16_224 --rate 0.1 --out out/demo/vit_base_dp --json out/demo/plan.json
	$(BIN)/pathsurgeon strip --in out/demo/vit_base_dp --out out/demo/vit_base_clean

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
