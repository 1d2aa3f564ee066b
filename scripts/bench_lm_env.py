"""Tokens per second of the token-level LM env: vectorized with a KV cache vs full re-encoding.

Three ways to generate the same greedy responses (max_new_tokens per prompt, embedded tiny GPT-2
unless --model is given):
  kv-vector      B prompts stepped together, one incremental forward per token (orl's path)
  reencode-vector  B prompts together, the whole sequence re-encoded every token
  reencode-single  one prompt at a time, re-encoded every token (the naive loop)
Ratios are against reencode-single measured in the same run.

    python scripts/bench_lm_env.py --batches 1 32 --out results/bench_lm_env.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from orl.text.generation import KVCachePolicy, ReencodePolicy, VectorTokenEnv, rollout

from orl.text.runtime import load_lm
from orl.envs.tiny_lm import build_tiny_lm, make_prompts


def tokens_per_second(policy_cls, model, tokenizer, prompts, max_new_tokens, per_prompt: bool, repeats: int) -> float:
    rates = []
    for repeat in range(repeats + 1):  # the first pass warms up and is not timed
        start, tokens = time.perf_counter(), 0
        groups = [[p] for p in prompts] if per_prompt else [prompts]
        for group in groups:
            env = VectorTokenEnv(tokenizer, group, max_new_tokens=max_new_tokens)
            env.eos_id = -1  # every response runs to max_new_tokens, so all paths generate the same count
            out = rollout(policy_cls(model), env, greedy=True)
            tokens += sum(len(r) for r in out["responses"])
        if repeat:
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF causal LM path (default: the embedded tiny GPT-2)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or str(build_tiny_lm("data/tiny-lm"))
    model, tokenizer = load_lm(path)
    model.eval()
    rows = []
    for batch in args.batches:
        prompts = make_prompts(batch, seed=batch)
        kv = tokens_per_second(KVCachePolicy, model, tokenizer, prompts, args.max_new_tokens, False, args.repeats)
        re_vec = tokens_per_second(ReencodePolicy, model, tokenizer, prompts, args.max_new_tokens, False, args.repeats)
        re_single = tokens_per_second(ReencodePolicy, model, tokenizer, prompts, args.max_new_tokens, True, args.repeats)
        rows.append({"batch": batch, "kv_vector": kv, "reencode_vector": re_vec, "reencode_single": re_single})
    print(f"\ntokens/s, model {path}, max_new_tokens {args.max_new_tokens}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| batch | kv-vector | reencode-vector | reencode-single | kv-vector / reencode-single | kv-vector / reencode-vector |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['kv_vector']:.0f} | {r['reencode_vector']:.0f} | {r['reencode_single']:.0f} | "
              f"{r['kv_vector'] / r['reencode_single']:.1f}x | {r['kv_vector'] / r['reencode_vector']:.1f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": path, "max_new_tokens": args.max_new_tokens, "rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
