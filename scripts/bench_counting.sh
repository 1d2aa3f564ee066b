#!/usr/bin/env bash
# The single-turn counting task (the embedded tiny LM's own task, reward increasing_numbers) through the same methods
# as scripts/bench_multiturn.sh: filtered BC (reward 1 rows), A-LoL, ILQL (beta 1 and 4; beta 4 also 2000 steps) on 2000 reference responses
# to training prompts, 300 steps; online GRPO (100 steps x 8 prompts x 8 completions) from the reference and from each
# offline policy; 3 seeds; evaluation on the 81 test-split prompts (never training prompts), A-LoL's values on the
# validation split. Finished runs are skipped when the script is run again.
set -e
cd "$(dirname "$0")/.."
B=${ORL_TRAIN:-.venv/bin/orl-train}
OUT=${OUT:-results/multiturn}
D=data/counting
[ -f $D/rows.jsonl ] || ${ORL_PYTHON:-.venv/bin/python} scripts/make_counting_data.py $D
mkdir -p $OUT/counting && cp $D/summary.json $OUT/counting/data.json
EVAL="lm.eval_prompts=$D/test_prompts.txt lm.value_prompts=$D/val_prompts.txt lm.holdout=0 lm.reward=increasing_numbers lm.max_new_tokens=24 log.progress=false log.tensorboard=false"
for seed in 0 1 2; do
  OFF="dataset=$D/rows.jsonl batch_size=32 agent.lr=3e-4 seed=$seed resume=true $EVAL"
  $B agent=alol agent.variant=nll lm.min_return=1 tag=filtered_bc run_dir=$OUT/counting/filtered_bc/seed$seed $OFF steps=300 eval.every=100 log.every=10
  $B agent=alol tag=alol run_dir=$OUT/counting/alol/seed$seed $OFF steps=300 eval.every=100 log.every=10
  $B agent=ilql agent.distill_steps=200 tag=ilql run_dir=$OUT/counting/ilql/seed$seed $OFF steps=300 eval.every=100 log.every=10
  $B agent=ilql agent.distill_steps=200 agent.beta=4 tag=ilql_beta4 run_dir=$OUT/counting/ilql_beta4/seed$seed $OFF steps=300 eval.every=100 log.every=10
  $B agent=ilql agent.distill_steps=200 agent.beta=4 tag=ilql_beta4_2k run_dir=$OUT/counting/ilql_beta4_2k/seed$seed $OFF steps=2000 eval.every=500 log.every=50
  ON="dataset=$D/prompts.jsonl agent=grpo agent.lr=3e-4 agent.num_generations=8 agent.max_completion_length=24 steps=100 batch_size=8 eval.every=25 log.every=5 seed=$seed resume=true $EVAL"
  $B tag=grpo run_dir=$OUT/counting/grpo/seed$seed $ON
  for method in filtered_bc alol ilql ilql_beta4; do
    $B init_from=$OUT/counting/$method/seed$seed tag=${method}+grpo run_dir=$OUT/counting/${method}+grpo/seed$seed $ON
  done
done
${ORL_REPORT:-.venv/bin/orl-report} $OUT/counting --order filtered_bc alol ilql ilql_beta4 ilql_beta4_2k grpo filtered_bc+grpo alol+grpo ilql+grpo ilql_beta4+grpo
