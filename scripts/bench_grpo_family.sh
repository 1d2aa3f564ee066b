#!/usr/bin/env bash
# GRPO family on reasoning-gym basic_arithmetic (2 terms, 1 digit, + and -) with the embedded tiny LM: 3 seeds,
# 200 steps x 16 prompts x 8 completions (25600 samples per run), lr 3e-4, 30% of the 242 distinct questions held out.
set -e
cd "$(dirname "$0")/.."
TASK='lm.task={size: 2000, seed: 0, min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: [+, -], allow_parentheses: false, allow_negation: false}'
COMMON="dataset=reasoning_gym:basic_arithmetic agent.lr=3e-4 agent.num_generations=8 agent.max_completion_length=6 lm.max_new_tokens=6 lm.holdout=0.3 steps=200 batch_size=16 eval.every=25 log.every=5 log.progress=false seed=0,1,2 hydra.sweep.dir=results/grpo_arith"
B=${ORL_TRAIN:-.venv/bin/orl-train}
$B -m agent=grpo agent.loss_type=grpo tag=grpo "$TASK" $COMMON
$B -m agent=grpo agent.loss_type=dr_grpo agent.scale_rewards=none tag=dr_grpo "$TASK" $COMMON
$B -m agent=grpo tag=dapo "$TASK" $COMMON
$B -m agent=rloo tag=rloo "$TASK" $COMMON
$B -m agent=rloo agent.advantage=remax tag=remax "$TASK" $COMMON
${ORL_REPORT:-.venv/bin/orl-report} results/grpo_arith --order grpo dr_grpo dapo rloo remax
