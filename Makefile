# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The declared floors (.ci/floors.txt), in an environment of their own, kept between runs.
FLOORS := .venv-floors
FLOORS_STAMP := $(FLOORS)/.installed
# A wheel installed into a clean environment, made anew each run.
WHEEL_VENV := .venv-wheel

.PHONY: demo test test-fast lint typecheck docs docs-serve dist check-wheel test-floors ci clean

$(STAMP): pyproject.toml setup.py pathsurgeon/_version.py
	@echo "Creating $(VENV): torch, timm, transformers and the test tools (several GB; a few minutes the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --progress-bar off -e ".[dev]"
	touch $(STAMP)

# The main job: offline, so it runs on random weights unless the weights are in the local HF cache.
demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/pathsurgeon add --model vit_base_patch16_224 --rate 0.1 --out out/demo/vit_base_dp --json out/demo/plan.json
	$(BIN)/pathsurgeon strip --in out/demo/vit_base_dp --out out/demo/vit_base_clean
	@echo "Demo outputs (two checkpoints of about 350 MB each, and the plan) are in out/demo/; make clean removes them."

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=10

# The fast tier, for the edit-test loop: the whole suite less the tests marked slow (pyproject.toml's markers).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy pathsurgeon

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or reference fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The same, served at http://127.0.0.1:8000 and rebuilt on every change.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The sdist and the wheel, built as pip builds them (an isolated environment from the package index).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# The wheel, installed (not editable) into a clean environment, run from outside the repository.
check-wheel: dist
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/pip install --quiet --progress-bar off "$$(ls dist/*.whl)[hf,export]"
	.ci/install_check.sh $(WHEEL_VENV)
	rm -rf $(WHEEL_VENV)  # 6 GB of a second torch: gone once checked (the floors' environment is kept)

$(FLOORS_STAMP): .ci/floors.txt pyproject.toml
	@echo "Creating $(FLOORS): the oldest supported torch, torchvision, timm and transformers (about 5 GB)..."
	rm -rf $(FLOORS)
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/pip install --quiet --upgrade pip
	$(FLOORS)/bin/pip install --quiet --progress-bar off -c .ci/floors.txt ".[dev]"
	touch $(FLOORS_STAMP)

# The sdist, installed (not editable) over the declared floors; the CLI and the quick start from outside
# the repository, then the test suite against that install.
test-floors: dist $(FLOORS_STAMP)
	$(FLOORS)/bin/pip install --quiet --no-deps --force-reinstall "$$(ls dist/*.tar.gz)"
	.ci/install_check.sh $(FLOORS)
	cd tests && ../$(FLOORS)/bin/python -m pytest -n 2 -rs -p no:cacheprovider --rootdir=.. -c ../pyproject.toml .

# What CI runs (.ci/run).
ci: lint typecheck test docs check-wheel test-floors

clean:
	rm -rf $(VENV) $(FLOORS) $(WHEEL_VENV) dist build site .pytest_cache .ruff_cache .mypy_cache out
