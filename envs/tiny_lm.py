"""The embedded default language model: a byte-level BPE tokenizer and a small GPT-2 that orl trains
itself on a corpus it generates, saved with `save_pretrained` so it loads through the same
`from_pretrained` path as `gpt2` or any hub id.

Corpus: lines "count: a b c ..." of integers 0-49; a third are strictly increasing, the rest are in
random order, so the reference model writes increasing sequences only sometimes and the
`increasing_numbers` reward has room to improve. And one-digit sums and differences in reasoning-gym's
`basic_arithmetic` format ("Calculate 4 - 1. Answer: 3"), right only half of the time (otherwise off by 1-3), so
the reference answers `dataset=reasoning_gym:basic_arithmetic` (2 terms, 1 digit, + and -) sometimes, not always.
And whole episodes of the built-in text games (`orl.envs.text_games`: guess_number, twenty_questions, grid_walk) in
the plain-text layout orl's multi-turn rollout renders (opening, then one line per agent turn and per reply), played
by a mix of the games' expert and imperfect behaviours (each game's CORPUS_MIX), so the reference model (sampled at
temperature 1) wins those games sometimes, not always. Game rows are tokenized segment by segment as the rollout
tokenizes a conversation (the opening with BOS by `encode_prompt`, each turn and reply by `encode_response`), and
only the agent's turns (and the final EOS) are trained on: the openings and replies are context.

    python -m orl.envs.tiny_lm data/tiny-lm        # or build_tiny_lm("data/tiny-lm")
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

SPECIAL = {"eos": "<|endoftext|>", "pad": "<pad>"}


def make_corpus(n_lines: int, seed: int, increasing_fraction: float = 1.0 / 3.0, arithmetic_lines: int = 0,
                arithmetic_correct: float = 0.5) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        length = int(rng.integers(3, 8))
        numbers = rng.choice(50, size=length, replace=False)
        if rng.random() < increasing_fraction:
            numbers = np.sort(numbers)
        lines.append("count: " + " ".join(str(int(x)) for x in numbers))
    arithmetic = np.random.default_rng(seed + 1)  # its own stream: the counting lines are the ones they always were
    for _ in range(arithmetic_lines):
        a, b, minus = int(arithmetic.integers(0, 11)), int(arithmetic.integers(0, 11)), bool(arithmetic.random() < 0.5)
        answer = a - b if minus else a + b
        if arithmetic.random() >= arithmetic_correct:
            answer += int(arithmetic.choice([-3, -2, -1, 1, 2, 3]))
        lines.append(f"Calculate {a} {'-' if minus else '+'} {b}. Answer: {answer}")
    return lines


def make_game_lines(n_per_game: int, seed: int) -> list[str]:
    """n_per_game episodes of each built-in text game in the plain-text layout (each ends with a newline), each played
    by a behaviour drawn from the game's CORPUS_MIX, on seeds of the training range [0, 10**9) (never an evaluation
    seed, orl.envs.text_games.eval_seeds)."""
    from orl.envs.text_games import TEXT_GAMES, play

    rng = np.random.default_rng(seed)  # its own stream: the other lines are the ones they always were
    lines = []
    for cls in TEXT_GAMES.values():
        env = cls()
        names = list(cls.CORPUS_MIX)
        weights = np.array([cls.CORPUS_MIX[n] for n in names], dtype=float)
        for _ in range(n_per_game):
            policy = cls.behaviours[names[int(rng.choice(len(names), p=weights / weights.sum()))]]
            lines.append(play(env, policy, int(rng.integers(0, 10**9)), rng).text)
    return lines


def game_row(tokenizer, episode: str, cache: dict | None = None) -> tuple[list[int], list[int]]:
    """The token ids of a plain-text episode as the multi-turn rollout builds them (BOS + encode_prompt(opening + "\\n"),
    then encode_response(segment + "\\n") per turn and reply) + EOS, and a 0/1 mask of the agent's own tokens (its turns
    and the final EOS). `cache` (a dict) memoizes the segments' ids across calls. For these games the ids equal those of
    BOS + the whole episode tokenized at once + EOS: the byte-level pre-tokenizer splits at every newline, so no token
    crosses a segment boundary (tests/test_text_games.py checks it)."""
    from orl.text.encoding import encode_prompt, encode_response

    cache = {} if cache is None else cache

    def encode(text: str, prompt: bool) -> list[int]:
        if (text, prompt) not in cache:
            cache[text, prompt] = (encode_prompt if prompt else encode_response)(tokenizer, text)
        return cache[text, prompt]

    segments = episode.split("\n")[:-1]
    ids = list(encode(segments[0] + "\n", True))
    agent = [0] * len(ids)
    for i, segment in enumerate(segments[1:]):
        piece = encode(segment + "\n", False)
        ids += piece
        agent += [int(i % 2 == 0)] * len(piece)
    return ids + [tokenizer.eos_token_id], agent + [1]


SPLITS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


def prompt_pool(split: str = "train") -> list[str]:
    """The prompt strings of one split of the demo task: "count: a" (a < 30) and "count: a b" (a < b < 40), 810 in
    all, partitioned once (a fixed permutation) into disjoint train (80%), validation (10%) and test (10%) strings,
    so a held-out prompt is never a training prompt."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    strings = [f"count: {a}" for a in range(30)] + [f"count: {a} {b}" for a in range(40) for b in range(a + 1, 40)]
    order = np.random.default_rng(0).permutation(len(strings))
    low, high = SPLITS[split]
    return [strings[i] for i in order[int(low * len(strings)) : int(high * len(strings))]]


def make_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """n prompts drawn (with replacement) from the strings of `split` (see prompt_pool)."""
    pool = prompt_pool(split)
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]


def _padded(rows: list[list[int]], pad_id: int, labels_mask: list[list[int]] | None = None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    trained = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        trained[i, : len(r)] = 1 if labels_mask is None else torch.tensor(labels_mask[i])
    lengths = mask.sum(1)
    return ids, mask, ids.masked_fill(trained == 0, -100), lengths


def build_tiny_lm(out_dir: str | Path, seed: int = 0, steps: int = 900, n_lines: int = 20000, context: int = 128,
                  arithmetic_lines: int = 8000, game_lines: int = 4000, game_batch: int = 16) -> Path:
    """Train tokenizer and model (about 50 s on one CPU core); returns the directory. Idempotent: a directory built
    with these settings is reused; one built with other settings (an older orl's) is rebuilt.

    Each step trains on 64 counting/arithmetic lines and, when game_lines > 0, on `game_batch` game episodes
    (game_lines per game in the corpus): the loss is the sum of the two batches' mean token losses, so the text lines
    are learnt as they were without the games."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from orl.envs.text_games import TEXT_GAMES

    out = Path(out_dir)
    settings = {"seed": seed, "steps": steps, "lines": n_lines, "arithmetic_lines": arithmetic_lines, "context": context,
                "game_lines": game_lines, "game_batch": game_batch,
                "games": {name: {"max_turns": cls.max_turns, "mix": cls.CORPUS_MIX} for name, cls in TEXT_GAMES.items()}}
    record = out / "orl_tiny_lm.json"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        built = json.loads(record.read_text()) if record.exists() else {}
        if {key: built.get(key, 0 if key == "arithmetic_lines" else None) for key in settings} == settings:
            return out
        print(f"[orl] rebuilding the embedded tiny LM at {out}: it was built with {built or 'unrecorded settings'}, now {settings}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    corpus = make_corpus(n_lines, seed, arithmetic_lines=arithmetic_lines)
    games = make_game_lines(game_lines, seed + 2)

    tokenizer_model = Tokenizer(models.BPE())
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=[SPECIAL["eos"], SPECIAL["pad"]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer_model.train_from_iterator(corpus + games, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, bos_token=SPECIAL["eos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"])

    # No dropout: a tiny model does not need it, and pi_theta == pi_ref then holds exactly at the start.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    rows = [[tokenizer.bos_token_id] + tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in corpus]
    cache: dict = {}
    game_rows = [game_row(tokenizer, episode, cache) for episode in games]
    width = max(len(r) for r in rows + [ids for ids, _ in game_rows])
    if width > context:
        raise ValueError(f"corpus lines need {width} positions, more than the context {context}")
    text = _padded(rows, tokenizer.pad_token_id)
    played = _padded([ids for ids, _ in game_rows], tokenizer.pad_token_id, [m for _, m in game_rows]) if game_rows else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    game_generator = torch.Generator().manual_seed(seed + 2)  # its own stream: the text batches are the ones they always were

    def batch_loss(data, index):
        ids, mask, labels, lengths = (t[index] for t in data)
        cut = int(lengths.max())  # no position past the longest row of the batch
        return model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], labels=labels[:, :cut]).loss

    model.train()
    for step in range(steps):
        loss = batch_loss(text, torch.randint(0, len(rows), (64,), generator=generator))
        if played is not None:
            loss = loss + batch_loss(played, torch.randint(0, len(game_rows), (game_batch,), generator=game_generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record.write_text(json.dumps({**settings, "final_loss": float(loss.detach())}))
    return out


if __name__ == "__main__":
    print(build_tiny_lm(sys.argv[1] if len(sys.argv) > 1 else "data/tiny-lm"))
