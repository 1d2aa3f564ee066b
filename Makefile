# Two targets a newcomer needs: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: prefs-bench setup run test bench compare lm-demo clean

# torch is pinned before the project is installed: on a CPU-only machine `torch==2.13.0` resolves to
# the CPU build, and the project's `torch>=2.4` is then already satisfied (no CUDA download).
# `make run` needs the core only; `make test` (and everything else) installs the extras too.
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

setup: $(VENV)/.installed
$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q -e ".[dev,lm,sweep,tasks]"
	touch $@

# The embedded default: orl's SAC collects a small Pendulum medium-replay dataset (first run only), then IQL
# trains on it offline for 10k steps and prints the normalized score (0 = random policy, 100 = the SAC expert).
run: $(VENV)/.core
	$(BIN)/orl-train steps=10000

# Two workers (pytest-xdist) halve the suite's wall time on a 2-core machine (8 min instead of 16); TEST_WORKERS=0 runs it
# in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

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
# One results folder per budget (results/compare_d3rlpy/steps<N>); the README's table: COMPARE_STEPS=10000 COMPARE_EVAL=5000.
COMPARE_STEPS ?= 30000
COMPARE_EVAL ?= 10000
compare: setup .venv-d3rlpy/.installed
	$(BIN)/python scripts/compare_d3rlpy.py run --datasets $(COMPARE_DATASETS) --steps $(COMPARE_STEPS) --eval-every $(COMPARE_EVAL) \
	  --d3rlpy-python .venv-d3rlpy/bin/python
	$(BIN)/python scripts/compare_d3rlpy.py report --steps $(COMPARE_STEPS)

# Preference-based learning benchmark (README): labels -> Bradley-Terry reward models -> P-IQL, P-TD3+BC, CPL;
# IQL on the true reward as the oracle. Every sweep skips runs that finished. Noisy labels never reach the
# reward model's 97% training-accuracy stop, so that set trains for at most 50 epochs (~10 s each here).
PREFS_DATASET ?= orl/halfcheetah/medium-replay-v0
PREFS_NAME ?= halfcheetah-medium-replay
PREFS_SETS ?= rational-2000 mistake0.1-2000 rational-500
PREFS_SWEEP = $(BIN)/orl-train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 seed=0,1,2 dataset=$(PREFS_DATASET) log.progress=false
prefs-bench: setup
	@for set in $(PREFS_SETS); do \
	  queries=$${set##*-}; teacher=$${set%-*}; mistake=0; epochs=300; [ "$$teacher" = "mistake0.1" ] && mistake=0.1 && epochs=50; \
	  labels=results/prefs/labels/$(PREFS_NAME)-$$set.npz; \
	  [ -f $$labels ] || $(BIN)/orl-prefs label $(PREFS_DATASET) --queries $$queries --length 50 --mistake $$mistake --seed 0 --out $$labels || exit 1; \
	  for seed in 0 1 2; do rm_dir=results/prefs/rm/$(PREFS_NAME)-$$set/seed$$seed; \
	    [ -f $$rm_dir/reward_model.pt ] || $(BIN)/orl-prefs reward $(PREFS_DATASET) $$labels --max-epochs $$epochs --seed $$seed --out $$rm_dir || exit 1; done; \
	  for method in ptd3bc piql; do $(PREFS_SWEEP) +experiment=prefs/$$method tag=$$method@$$set \
	    "data.reward=learned:results/prefs/rm/$(PREFS_NAME)-$$set/seed\$${seed}" hydra.sweep.dir=results/prefs/$(PREFS_NAME)-$$set || exit 1; done; \
	  $(PREFS_SWEEP) +experiment=prefs/cpl tag=cpl@$$set agent.preferences=$$labels hydra.sweep.dir=results/prefs/$(PREFS_NAME)-$$set || exit 1; \
	done
	$(PREFS_SWEEP) +experiment=prefs/oracle_iql hydra.sweep.dir=results/prefs/$(PREFS_NAME)-oracle
	$(BIN)/python scripts/prefs_table.py results/prefs

lm-demo: setup
	$(BIN)/python scripts/lm_demo.py

clean:
	rm -rf $(VENV) runs data
