#!/usr/bin/env bash
# The ablations behind WSRL's claim (docs/results.md "Offline-to-online on MuJoCo"), on the Intel collection:
#   iql_no_retention, calql_no_retention: IQL / Cal-QL fine-tuned on online data only (no-retention baselines);
#   wsrl_no_warmup:     WSRL with updates from the first online batch (no 5000-step warm-up).
# Each starts from the pre-trained agent of the matching run in results/o2o_mujoco_xeon (init_from its offline.pt),
# so only the online phase differs from that run: 20k environment steps, about 1 h on one thread (IQL: minutes). Those runs must
# have finished their offline phase here (scripts/bench_o2o_mujoco.sh with COLLECTION=xeon); offline.pt is not in git.
# Re-running skips finished runs and resumes interrupted ones. Extra arguments go to every run.
#   bash scripts/bench_o2o_ablation.sh
#   orl-report results/o2o_mujoco_xeon results/o2o_mujoco_xeon_ablation --out results/o2o_mujoco_xeon_ablation/report \
#     --order iql iql_no_retention calql calql_no_retention wsrl wsrl_no_warmup
set -x
cd "$(dirname "$0")/.."
B=${ORL_FINETUNE:-.venv/bin/orl-finetune}
. scripts/use_xeon_collection.sh || exit 1  # the committed datasets, unpacked and checked
SOURCE=results/o2o_mujoco_xeon
OUT=results/o2o_mujoco_xeon_ablation
for seed in 0 1 2; do
  for dataset in orl/hopper/medium-v0 orl/halfcheetah/medium-replay-v0; do
    for pair in iql:iql_no_retention calql:calql_no_retention wsrl:wsrl_no_warmup; do
      base=${pair%%:*} variant=${pair##*:}
      name="dataset=${dataset//\//-},seed=$seed"
      pretrained="$SOURCE/+experiment=o2o_mujoco-$base,$name"
      if [ ! -f "$pretrained/offline.pt" ]; then
        echo "skip $variant $name: $pretrained has no offline.pt yet"; continue
      fi
      $B +experiment=o2o_mujoco/$variant dataset=$dataset seed=$seed init_from="'$pretrained'" \
        run_dir="'$OUT/$variant,$name'" resume=true log.progress=false "$@" || exit 1
    done
  done
done
