#!/usr/bin/env bash
# A2PR vs TD3+BC (issue 26, item 1) on the four collected MuJoCo datasets, at the README's A2PR budget (10k gradient
# steps, 10 evaluation episodes every 2k; configs/experiment/baselines/a2pr.yaml): A2PR with its per-dataset presets
# (the official README's settings), then with its default config, 3 seeds each, seed-major so an interrupted queue
# leaves every dataset with the same seeds. Re-running skips finished runs and resumes interrupted ones. TD3+BC's runs
# are results/baselines (read at step 10k). About 13 min per run on one CPU core.
# The preset runs are labelled a2pr, the default config's a2pr_default (tag).
#   bash scripts/bench_a2pr.sh && orl-report results/baselines results/a2pr --at-step 10000 --agents td3bc a2pr a2pr_default
set -x
cd "$(dirname "$0")/.."
B=${ORL_TRAIN:-.venv/bin/orl-train}
for seed in 0 1 2; do
  for ds in hopper-medium hopper-medium-replay halfcheetah-medium halfcheetah-medium-replay; do
    env=${ds%%-*}; level=${ds#*-}
    $B -m +experiment=baselines/a2pr dataset=orl/$env/$level-v0 +preset=a2pr-$ds seed=$seed hydra.sweep.dir=results/a2pr log.progress=false
  done
done
for seed in 0 1 2; do
  $B -m +experiment=baselines/a2pr dataset=orl/hopper/medium-v0,orl/hopper/medium-replay-v0,orl/halfcheetah/medium-v0,orl/halfcheetah/medium-replay-v0 \
    seed=$seed tag=a2pr_default hydra.sweep.dir=results/a2pr log.progress=false
done
