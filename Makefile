# Set-up and the two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv trainer browser demo demo-grid test gpu-wheelhouse

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,slurm,optuna,tracking]'
	touch $@

venv: $(BIN)/.installed

# SimpleTuner 4.10.1 in its own Python 3.12 venv, once per machine (user cache).
trainer: venv
	$(BIN)/sd3exp setup-trainer

# Debian's Chromium for the report's headless-browser test.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

demo: trainer
	$(BIN)/python -m sd3exp experiment=demo

# The README's picture: the demo's grid, copied to docs/demo-grid.png.
demo-grid: demo
	$(BIN)/python docs/demo_grid.py outputs/demo docs/demo-grid.png

# Lint and type-check first ([tool.ruff] and [tool.mypy] in pyproject.toml), then the suite: all but the
# Slurm tests in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (a file's
# fixtures, a trained run or a server, are built once), the slowest files first (tests/conftest.py);
# then the Slurm tests alone, whose one-node cluster runs trainings of its own. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: trainer browser
	$(BIN)/ruff check sd3exp hydra_plugins tests benchmarks docs
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slurm" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25; rest=$$?; \
	$(BIN)/python -m pytest -m slurm --durations=5; slurm=$$?; \
	exit $$(( rest != 0 ? rest : slurm ))

# What benchmarks/gpu_check.py needs beyond a bare torch/transformers/accelerate/peft GPU image, for
# an offline install there (it reaches no registry): diffusers, as wheels in benchmarks/wheelhouse/
# (~14 MB; GPU_PYTHON: the image's Python version).
GPU_PYTHON ?= 3.12
gpu-wheelhouse: venv
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) -d benchmarks/wheelhouse diffusers==0.42.1 pillow importlib_metadata zipp httpx httpcore h11 anyio sniffio
