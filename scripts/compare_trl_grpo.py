"""orl's agent=grpo against TRL's GRPOTrainer, side by side on the same tiny model, task, prompts, reward and
number of generated samples: held-out exact-match accuracy and wall-clock time.

Both train the embedded tiny LM on reasoning-gym's basic_arithmetic (2 terms, 1 digit, + and -) with TRL's
GRPO defaults where they apply (loss dapo, group-scaled advantages, epsilon 0.2, beta 0, temperature 1) and the
same settings otherwise: 16 prompts x 8 completions per step, 6 new tokens at most, AdamW lr 3e-4 constant,
gradient clipping 1.0, one torch thread. The reward is one exact-match function in TRL's signature for both.
Prompts carry the tokenizer's BOS for both (the tiny LM was trained with it; orl prepends it, TRL's plain-text path
does not). Both trained policies are then scored by the same code: sampled completions (T = 1, a fixed seed) of
the held-out questions, exact match.

    python scripts/compare_trl_grpo.py --seeds 0 1 2 --steps 200 --out results/compare_trl_grpo
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

TASK = {"size": 2000, "seed": 0, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
        "allow_parentheses": False, "allow_negation": False}


def exact(prompts, completions, answer, **kwargs):
    from orl.envs.reasoning_gym import extract

    return [float(extract(c) == a) for c, a in zip(completions, answer)]


def split(rows: list[dict], seed: int, held_out: float = 0.3) -> tuple[list[dict], list[dict]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = int(round(held_out * len(rows)))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def accuracy(model, tokenizer, rows: list[dict], seed: int, greedy: bool = False) -> float:
    from orl.text.generation import KVCachePolicy, VectorTokenEnv, rollout
    from orl.text.runtime import eos_token_ids

    model.eval()
    env = VectorTokenEnv(tokenizer, [r["prompt"] for r in rows], None, 6, eos_ids=eos_token_ids(tokenizer, model))
    out = rollout(KVCachePolicy(model), env, greedy=greedy, generator=torch.Generator().manual_seed(10_000 + seed))
    return float(np.mean(exact(None, out["texts"], [r["answer"] for r in rows])))


def run_orl(model_path: str, train: list[dict], steps: int, seed: int) -> tuple[object, float]:
    import orl
    from orl.text.data import PromptBuffer

    torch.manual_seed(seed)
    space = gym.spaces.Discrete(2)
    agent = orl.make_agent("grpo", space, space, {"model_path": model_path, "lr": 3e-4, "num_generations": 8, "max_completion_length": 6,
                                                  "seed": seed})
    agent.set_rewards([exact])
    buffer = PromptBuffer([r["prompt"] for r in train], "cpu", {"answer": [r["answer"] for r in train]})
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        agent.update(buffer.sample(16, generator))
    return agent.nets["policy"], time.perf_counter() - start


def run_trl(model_path: str, train: list[dict], steps: int, seed: int, work: Path) -> tuple[object, float]:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    rows = [{"prompt": tokenizer.bos_token + r["prompt"], "answer": r["answer"]} for r in train]  # the BOS orl prepends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.GRPOConfig(output_dir=str(work / f"trl-seed{seed}"), per_device_train_batch_size=16 * 8, num_generations=8,
                              max_completion_length=6, learning_rate=3e-4, lr_scheduler_type="constant", max_steps=steps, beta=0.0,
                              loss_type="dapo", temperature=1.0, epsilon=0.2, max_grad_norm=1.0, seed=seed, data_seed=seed,
                              logging_steps=max(steps // 10, 1), save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                              disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[exact], args=args, train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
    return trainer.model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model-dir", default="data/tiny-lm")
    parser.add_argument("--out", default="results/compare_trl_grpo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from orl.envs.reasoning_gym import load_rows
    from orl.envs.tiny_lm import build_tiny_lm
    from orl.provenance import file_checksum, software
    from orl.text.runtime import load_lm

    model_path = str(build_tiny_lm(args.model_dir))
    rows = load_rows("reasoning_gym:basic_arithmetic", TASK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference, tokenizer = load_lm(model_path)
    samples = args.steps * 16 * 8
    for seed in args.seeds:
        path = out / f"seed{seed}.json"
        if path.exists():
            continue
        train, held_out = split(rows, seed)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
        result = {"seed": seed, "steps": args.steps, "samples": samples, "train_questions": len(train), "held_out_questions": len(held_out),
                  "reference_accuracy": accuracy(reference, tokenizer, held_out, seed),
                  # the reference's most likely answers: where a policy that only sharpens its distribution ends up
                  "reference_greedy_accuracy": accuracy(reference, tokenizer, held_out, seed, greedy=True)}
        for library, runner in (("orl", lambda: run_orl(model_path, train, args.steps, seed)),
                                ("trl", lambda: run_trl(model_path, train, args.steps, seed, out))):
            policy, seconds = runner()
            result[library] = {"accuracy": accuracy(policy, tokenizer, held_out, seed), "train_seconds": round(seconds, 1),
                               "samples_per_s": round(samples / seconds, 1)}
            print(f"seed {seed} {library}: accuracy {result[library]['accuracy']:.3f}, {seconds:.0f} s", flush=True)
        result["provenance"] = {"tiny_lm_sha256": file_checksum(Path(model_path) / "model.safetensors"), **software()}
        path.write_text(json.dumps(result, indent=1))
    results = [json.loads((out / f"seed{s}.json").read_text()) for s in args.seeds]
    lines = ["| | held-out accuracy | train time (s) | samples/s |", "|---|---:|---:|---:|",
             f"| reference (sampled) | {np.mean([r['reference_accuracy'] for r in results]):.3f} ± {np.std([r['reference_accuracy'] for r in results]):.3f} | - | - |",
             f"| reference (greedy) | {np.mean([r['reference_greedy_accuracy'] for r in results]):.3f} ± "
             f"{np.std([r['reference_greedy_accuracy'] for r in results]):.3f} | - | - |"]
    for library in ("orl", "trl"):
        acc = [r[library]["accuracy"] for r in results]
        secs = [r[library]["train_seconds"] for r in results]
        rate = [r[library]["samples_per_s"] for r in results]
        lines.append(f"| {library} | {np.mean(acc):.3f} ± {np.std(acc):.3f} | {np.mean(secs):.0f} | {np.mean(rate):.0f} |")
    table = "\n".join(lines) + f"\n\n{len(results)} seeds, {args.steps} steps x 128 completions ({samples} samples per run).\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
