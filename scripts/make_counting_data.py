"""The single-turn counting task's data for scripts/bench_multiturn.sh: the embedded tiny LM's responses (temperature 1,
24 new tokens) to 2000 training prompts, scored by increasing_numbers, as {"prompt","response","reward"} rows; the
distinct training prompts as {"prompt"} rows (online RL); the test split's prompt strings (never a training prompt),
one per line, for lm.eval_prompts, and the validation split's for A-LoL's values (lm.value_prompts).

    python scripts/make_counting_data.py data/counting
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from orl.envs.text_rewards import increasing_numbers
from orl.envs.tiny_lm import build_tiny_lm, make_prompts, prompt_pool
from orl.text.generation import KVCachePolicy, VectorTokenEnv, rollout
from orl.text.runtime import context_length, load_lm


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_lm(str(build_tiny_lm("data/tiny-lm")))
    prompts = make_prompts(2000, seed=100, split="train")
    test = prompt_pool("test")
    assert not set(test) & set(prompts)
    rows = []
    generator = torch.Generator().manual_seed(1)
    for start in range(0, len(prompts), 250):
        part = prompts[start : start + 250]
        env = VectorTokenEnv(tokenizer, part, increasing_numbers, 24, context_length(model, tokenizer))
        sampled = rollout(KVCachePolicy(model), env, greedy=False, generator=generator)
        rows += [{"prompt": p, "response": r, "reward": float(w)} for p, r, w in zip(part, sampled["texts"], sampled["rewards"])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in dict.fromkeys(prompts)))
    (out / "test_prompts.txt").write_text("".join(p + "\n" for p in test))
    (out / "val_prompts.txt").write_text("".join(p + "\n" for p in prompt_pool("val")))  # A-LoL's V_ref (lm.value_prompts)
    rewards = [r["reward"] for r in rows]
    summary = {"rows": len(rows), "reward_mean": sum(rewards) / len(rewards), "reward_1": sum(w >= 1.0 for w in rewards) / len(rewards),
               "train_prompts": len(set(prompts)), "test_prompts": len(test)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(summary)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/counting"))
