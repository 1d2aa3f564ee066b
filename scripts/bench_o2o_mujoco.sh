#!/usr/bin/env bash
# WSRL vs Cal-QL vs IQL offline-to-online on MuJoCo (issue 26 item 2): Hopper medium and HalfCheetah medium-replay
# (the collected datasets whose offline scores leave the most room), 10k offline gradient steps then the same 20k
# environment steps for every method, 3 seeds; settings in configs/experiment/o2o_mujoco/. Seed-major, so an
# interrupted queue leaves every dataset with the same seeds; re-running skips finished runs and resumes others.
# Cost, measured 2026-12-02 with two runs sharing a 2-core EPYC of family 26: IQL 8-13 min, Cal-QL ~75 min, WSRL ~80 min
# per run, so the grid is about 16 core-hours; on family 25 (Zen 3) a Cal-QL run is an estimated ~2.3 h on one core,
# and WSRL took 104 min with threads=2 (docs/results.md "Offline-to-online on MuJoCo", docs/speed.md). On a fresh
# machine, collect the datasets first (docs/results.md "Datasets and checksums"); scripts/check_datasets.py checks them.
# Extra arguments are passed to every run (e.g. device=cuda).
#   bash scripts/bench_o2o_mujoco.sh && orl-report results/o2o_mujoco --order iql calql wsrl
# COLLECTION=xeon runs the grid on the Intel Xeon collection instead (results/datasets_xeon.json), whose two datasets
# are committed in results/o2o_mujoco_xeon/datasets.tgz: any processor can run it, without collecting. They are
# unpacked into data/minari-xeon (never ~/.minari) and checked against their checksums; runs go to results/o2o_mujoco_xeon.
#   COLLECTION=xeon bash scripts/bench_o2o_mujoco.sh && orl-report results/o2o_mujoco_xeon --order iql calql wsrl
set -x
cd "$(dirname "$0")/.."
B=${ORL_FINETUNE:-.venv/bin/orl-finetune}
SWEEP=results/o2o_mujoco
if [ "${COLLECTION:-}" = xeon ]; then
  . scripts/use_xeon_collection.sh || exit 1
  SWEEP=results/o2o_mujoco_xeon
fi
for seed in 0 1 2; do
  $B -m +experiment=o2o_mujoco/iql,o2o_mujoco/calql,o2o_mujoco/wsrl dataset=orl/hopper/medium-v0,orl/halfcheetah/medium-replay-v0 \
    seed=$seed log.progress=false hydra.sweep.dir=$SWEEP "$@"
done
