# Two targets a newcomer needs: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench compare lm-demo clean

# torch is pinned before the project is installed: on a CPU-only machine `torch==2.13.0` resolves to
# the CPU build, and the project's `torch>=2.4` is then already satisfied (no CUDA download).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,lm,sweep]"
	touch $@

run: setup
	$(BIN)/orl-train

test: setup
	$(BIN)/python -m pytest -q

# d3rlpy pins an older gymnasium, so it gets its own environment for the comparison.
.venv-d3rlpy/.installed:
	$(PYTHON) -m venv .venv-d3rlpy
	.venv-d3rlpy/bin/pip install -q torch==2.13.0 d3rlpy "gymnasium[mujoco]==1.0.0"
	touch $@

bench: setup .venv-d3rlpy/.installed
	$(BIN)/python scripts/bench_updates.py --d3rlpy-python .venv-d3rlpy/bin/python --out results/bench_updates.json
	$(BIN)/python scripts/bench_lm_env.py --out results/bench_lm_env.json

# orl vs d3rlpy on the collected MuJoCo datasets (same file, seeds, evaluation): README "Against d3rlpy".
COMPARE_DATASETS ?= orl/halfcheetah/medium-v0 orl/halfcheetah/medium-replay-v0 orl/hopper/medium-v0 orl/hopper/medium-replay-v0
compare: setup .venv-d3rlpy/.installed
	$(BIN)/python scripts/compare_d3rlpy.py run --datasets $(COMPARE_DATASETS) --d3rlpy-python .venv-d3rlpy/bin/python
	$(BIN)/python scripts/compare_d3rlpy.py report

lm-demo: setup
	$(BIN)/python scripts/lm_demo.py

clean:
	rm -rf $(VENV) runs data
