#!/usr/bin/env bash
# Multi-turn text tasks with the embedded tiny LM (docs/lm.md, "Conversations"): per task, the reference (the tiny LM at
# temperature 1) logs 1024 conversations from training seeds; filtered BC (A-LoL's nll on the conversations that
# succeeded), A-LoL and ILQL (decoding beta 1 and 4) train 300 steps on them (ILQL beta 4 also 2000); online GRPO trains 100 steps of 8 seeds x 8
# conversations (6400 conversations) from the reference and, through init_from, from each offline policy. 3 training
# seeds; every evaluation plays 256 held-out seeds (10**9 + i). Finished runs are skipped when the script is run again.
#   bash scripts/bench_multiturn.sh            # ~20 min per task on one CPU core
set -e
cd "$(dirname "$0")/.."
B=${ORL_TRAIN:-.venv/bin/orl-train}
C=${ORL_COLLECT:-.venv/bin/orl-collect}
OUT=${OUT:-results/multiturn}
TASKS=${TASKS:-"guess_number grid_walk"}
EVAL="lm.num_eval_episodes=256 log.progress=false log.tensorboard=false"
for task in $TASKS; do
  log=data/conversations/$task-1024-seed0.jsonl
  [ -f "$log" ] || $C env=text:$task conversations.episodes=1024 conversations.out=$log progress=false
  mkdir -p $OUT/$task && cp "${log%.jsonl}.json" $OUT/$task/log.json
  for seed in 0 1 2; do
    OFF="dataset=$log batch_size=32 lm.max_new_tokens=4 agent.lr=3e-4 seed=$seed resume=true $EVAL"
    $B agent=alol agent.variant=nll lm.min_return=1 tag=filtered_bc run_dir=$OUT/$task/filtered_bc/seed$seed $OFF steps=300 eval.every=100 log.every=10
    $B agent=alol tag=alol run_dir=$OUT/$task/alol/seed$seed $OFF steps=300 eval.every=100 log.every=10
    $B agent=ilql agent.distill_steps=200 tag=ilql run_dir=$OUT/$task/ilql/seed$seed $OFF steps=300 eval.every=100 log.every=10
    $B agent=ilql agent.distill_steps=200 agent.beta=4 tag=ilql_beta4 run_dir=$OUT/$task/ilql_beta4/seed$seed $OFF steps=300 eval.every=100 log.every=10
    # do ILQL's values need more than 300 steps? (2000 steps, evaluated every 500)
    $B agent=ilql agent.distill_steps=200 agent.beta=4 tag=ilql_beta4_2k run_dir=$OUT/$task/ilql_beta4_2k/seed$seed $OFF steps=2000 eval.every=500 log.every=50
    ON="env=text:$task agent=grpo agent.lr=3e-4 agent.num_generations=8 agent.max_completion_length=4 steps=100 batch_size=8 eval.every=25 log.every=5 seed=$seed resume=true $EVAL"
    $B tag=grpo run_dir=$OUT/$task/grpo/seed$seed $ON
    for method in filtered_bc alol ilql ilql_beta4; do
      $B init_from=$OUT/$task/$method/seed$seed tag=${method}+grpo run_dir=$OUT/$task/${method}+grpo/seed$seed $ON
    done
  done
done
for task in $TASKS; do
  ${ORL_REPORT:-.venv/bin/orl-report} $OUT/$task --order filtered_bc alol ilql ilql_beta4 ilql_beta4_2k grpo filtered_bc+grpo alol+grpo ilql+grpo ilql_beta4+grpo
done
