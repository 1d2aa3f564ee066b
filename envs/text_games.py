"""Built-in multi-turn text tasks with programmatic partners, small enough for the embedded tiny GPT-2 to learn.

Each task implements `orl.text.conversation.TextEnv` (gymnasium's reset/step with strings); an episode is fully
determined by its seed (`numpy.random.default_rng(seed)`, never global random state). They follow the
guess-my-city / twenty-questions style of LMRL-Gym (Abdulhai et al., 2023, "LMRL Gym: Benchmarks for Multi-Turn
Reinforcement Learning with Language Models", arXiv:2311.18232), shrunk to a few words per turn so a whole episode
fits about 100 tokens of a tiny model's context.

* `GuessNumber` ("text:guess_number"): a secret integer in 1..max_number (16 by default). Opening "guess 1-16"; the
  agent says a number ("8"); the partner answers "higher", "lower" or "correct". 16 distinct episodes.
* `TwentyQuestions` ("text:twenty_questions"): one of 8 animals, told apart by 3 yes/no attributes (big, fly, swim:
  each animal has its own combination, so the 3 questions identify it). Opening "guess the animal"; the agent asks
  "big?", "fly?" or "swim?" (answered "yes" / "no") or names an animal ("duck"), answered "correct" or "wrong"
  (the game goes on after a wrong guess). 8 distinct episodes.
* `GridWalk` ("text:grid_walk"): a 1-D corridor of positions 0..size-1 (size 8 by default). Opening "at 2 goal 5"; the
  agent says "left" or "right"; the partner answers with the new position ("at 3"); the ends are walls (a move into
  one leaves the position as it is). Start and goal differ: 56 distinct episodes.

Common rules. Reward 1 on success (the episode terminates, info["success"] True), else 0: binary by default; the
option `turn_penalty` (0 by default) subtracts that much on every agent turn, a shaped variant that prefers short
episodes. A move the partner cannot parse (other words, a number outside the range) is answered "invalid" with
info["invalid"] True; it counts as a turn and earns nothing. At the `max_turns`-th agent turn (6, 6 and 8) without
success the episode is truncated (info["success"] False). info["success"] is set on the step that ends an episode;
stepping an ended episode raises RuntimeError. Parsing ignores case, surrounding white space and trailing ".", "!"
and "?", so "Big?", "big" and " big? " are the same question.

Plain-text layout (how a model without a chat template sees an episode; orl's rollout renders it like this and the
embedded tiny LM is trained on it, see `plain_text`):

    opening \\n turn_1 \\n reply_1 \\n turn_2 \\n ... turn_K \\n        (the reply after the last turn is not shown)

Held-out evaluation: orl trains on seeds from `train_seeds` (drawn in [0, 10**9)) and evaluates on `eval_seeds`
(10**9, 10**9 + 1, ...), disjoint by construction. Disjoint seeds are not disjoint episodes, though: the tasks have
only 16 (guess_number at its default max_number), 8 (twenty_questions) and 56 (grid_walk at its default size)
distinct episodes, so a held-out seed almost always replays a secret / animal / start-goal pair seen in training.
The held-out score measures the policy on fresh samples of the same small task, not generalisation to new episodes.

Each task also has an `expert` (succeeds on every episode) and imperfect `behaviours` (policies of the transcript:
`policy(opening, history, rng) -> move`, history the (move, reply) pairs so far), which `orl.envs.tiny_lm` mixes
(`CORPUS_MIX`) into the tiny LM's corpus so the reference model succeeds sometimes, not always.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from orl.errors import ConfigError

if TYPE_CHECKING:  # the protocol these classes implement
    from orl.text.conversation import TextEnv

History = list[tuple[str, str]]
Policy = Callable[[str, History, np.random.Generator], str]

TRAIN_SEED_HIGH = 10**9  # training seeds lie in [0, 10**9); evaluation seeds are 10**9 + i


def train_seeds(n: int, seed: int) -> list[int]:
    """n training episode seeds drawn (with replacement) from [0, 10**9) by numpy's generator seeded with `seed`."""
    return [int(s) for s in np.random.default_rng(seed).integers(0, TRAIN_SEED_HIGH, size=n)]


def eval_seeds(n: int) -> list[int]:
    """The first n held-out evaluation seeds: 10**9 + i, never a training seed (see the module docstring for what that
    does and does not hold out)."""
    return [TRAIN_SEED_HIGH + i for i in range(n)]


def normalize(action: str) -> str:
    return action.strip().lower().strip(".!?").strip()


def plain_text(opening: str, moves: list[str], replies: list[str]) -> str:
    """An episode in the plain-text layout: opening, then each move and the reply to it, one per line; the reply to the
    last move is left out (the episode ended there). Ends with a newline."""
    parts = [opening]
    for i, move in enumerate(moves):
        parts.append(move)
        if i < len(moves) - 1:
            parts.append(replies[i])
    return "\n".join(parts) + "\n"


class _Game:
    """The bookkeeping every task shares: turns, truncation, rewards, info. Subclasses implement `_start(rng)` (the
    opening) and `_move(word)` -> (reply, success, invalid)."""

    name = ""
    max_turns = 6
    system_prompt: str | None = None
    behaviours: ClassVar[dict[str, Policy]] = {}  # name -> policy; "expert" wins every episode
    CORPUS_MIX: ClassVar[dict[str, float]] = {}  # behaviour -> weight in the tiny LM's corpus

    def __init__(self, max_turns: int | None = None, turn_penalty: float = 0.0, system_prompt: str | None = None):
        if max_turns is not None:
            if int(max_turns) < 1:
                raise ConfigError(f"{self.name}: max_turns must be at least 1, got {max_turns}")
            self.max_turns = int(max_turns)
        self.turn_penalty = float(turn_penalty)
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self._turn = 0
        self._done = True
        self._opening: str | None = None

    def reset(self, seed: int) -> tuple[str, dict]:
        rng = np.random.default_rng(int(seed))
        self._turn, self._done = 0, False
        self._opening = self._start(rng)
        return self._opening, {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError(f"{self.name}: the episode has ended (or was never started); call reset(seed)")
        self._turn += 1
        reply, success, invalid = self._move(normalize(action))
        terminated = success
        truncated = not success and self._turn >= self.max_turns
        reward = (1.0 if success else 0.0) - self.turn_penalty
        info: dict = {"invalid": invalid, "turn": self._turn}
        if terminated or truncated:
            self._done = True
            info["success"] = success
        return reply, reward, terminated, truncated, info

    # the tasks' own parts
    def _start(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def _move(self, word: str) -> tuple[str, bool, bool]:
        raise NotImplementedError

    @classmethod
    def expert(cls, opening: str, history: History, rng: np.random.Generator | None = None) -> str:
        return cls.behaviours["expert"](opening, history, rng or np.random.default_rng(0))


@dataclass
class Episode:
    opening: str
    moves: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    success: bool = False
    truncated: bool = False

    @property
    def text(self) -> str:
        return plain_text(self.opening, self.moves, self.replies)


def play(env, policy: Policy, seed: int, rng: np.random.Generator | None = None) -> Episode:
    """One episode of `env` (seeded with `seed`) played by `policy` (its randomness from `rng`; by default a stream
    seeded by (seed, 1), independent of the environment's)."""
    rng = rng if rng is not None else np.random.default_rng([int(seed), 1])
    opening, _ = env.reset(seed)
    episode = Episode(opening)
    while True:
        move = policy(opening, list(zip(episode.moves, episode.replies)), rng)
        reply, reward, terminated, truncated, info = env.step(move)
        episode.moves.append(move)
        episode.replies.append(reply)
        episode.rewards.append(reward)
        if terminated or truncated:
            episode.success, episode.truncated = bool(info["success"]), bool(truncated)
            return episode


# --- guess the number -------------------------------------------------------------------------------------------------

def _number_range(opening: str, history: History) -> tuple[int, int, set[int]]:
    """The interval the hints so far leave, and the numbers already said."""
    match = re.fullmatch(r"guess (\d+)-(\d+)", opening)
    low, high = (int(match.group(1)), int(match.group(2))) if match else (1, 16)
    tried = set()
    for move, reply in history:
        if not normalize(move).isdigit():
            continue
        number = int(normalize(move))
        tried.add(number)
        if reply == "higher":
            low = max(low, number + 1)
        elif reply == "lower":
            high = min(high, number - 1)
    return low, max(low, high), tried


def _bisect(opening: str, history: History, rng: np.random.Generator) -> str:
    low, high, _ = _number_range(opening, history)
    return str((low + high) // 2)


def _consistent(opening: str, history: History, rng: np.random.Generator) -> str:
    """A random number the hints allow, not said before."""
    low, high, tried = _number_range(opening, history)
    options = [n for n in range(low, high + 1) if n not in tried] or list(range(low, high + 1))
    return str(int(rng.choice(options)))


def _any_number(opening: str, history: History, rng: np.random.Generator) -> str:
    """A random number of the whole range: ignores the hints, may repeat itself."""
    low, high, _ = _number_range(opening, [])
    return str(int(rng.integers(low, high + 1)))


class GuessNumber(_Game):
    """Guess a secret integer in 1..max_number from "higher" / "lower" hints (see the module docstring)."""

    name = "guess_number"
    max_turns = 6
    behaviours = {"expert": _bisect, "consistent": _consistent, "random": _any_number}
    CORPUS_MIX = {"expert": 0.2, "consistent": 0.2, "random": 0.6}

    def __init__(self, max_number: int = 16, max_turns: int | None = None, turn_penalty: float = 0.0, system_prompt: str | None = None):
        if int(max_number) < 2:
            raise ConfigError(f"guess_number: max_number must be at least 2, got {max_number}")
        self.max_number = int(max_number)
        super().__init__(max_turns, turn_penalty, system_prompt)

    def _start(self, rng: np.random.Generator) -> str:
        self.secret = int(rng.integers(1, self.max_number + 1))
        return f"guess 1-{self.max_number}"

    def _move(self, word: str) -> tuple[str, bool, bool]:
        if not word.isdigit() or not 1 <= int(word) <= self.max_number:
            return "invalid", False, True
        number = int(word)
        if number == self.secret:
            return "correct", True, False
        return ("higher" if self.secret > number else "lower"), False, False


# --- twenty questions ---------------------------------------------------------------------------------------------------

ATTRIBUTES = ("big", "fly", "swim")
ANIMALS = {  # (big, fly, swim): every animal its own combination, so the three questions identify it
    "ant": (0, 0, 0), "frog": (0, 0, 1), "bee": (0, 1, 0), "duck": (0, 1, 1),
    "lion": (1, 0, 0), "whale": (1, 0, 1), "eagle": (1, 1, 0), "swan": (1, 1, 1),
}


def _candidates(history: History) -> tuple[list[str], set[str], set[str]]:
    """Animals consistent with the answers so far, the attributes asked, the animals guessed."""
    candidates, asked, guessed = list(ANIMALS), set(), set()
    for move, reply in history:
        word = normalize(move)
        if word in ATTRIBUTES and reply in ("yes", "no"):
            asked.add(word)
            index = ATTRIBUTES.index(word)
            candidates = [a for a in candidates if ANIMALS[a][index] == (reply == "yes")]
        elif word in ANIMALS:
            guessed.add(word)
            if reply == "wrong":
                candidates = [a for a in candidates if a != word]
    return candidates, asked, guessed


def _ask_all(opening: str, history: History, rng: np.random.Generator) -> str:
    """Ask big, fly and swim in that order, then name the one animal that fits."""
    candidates, asked, _ = _candidates(history)
    for attribute in ATTRIBUTES:
        if attribute not in asked:
            return attribute + "?"
    return candidates[0]


def _ask_some(opening: str, history: History, rng: np.random.Generator) -> str:
    """Ask a random question (repeats possible) half of the time, else guess an animal that fits the answers."""
    candidates, _, guessed = _candidates(history)
    if rng.random() < 0.5:
        return str(rng.choice(ATTRIBUTES)) + "?"
    return str(rng.choice([a for a in candidates if a not in guessed] or candidates))


def _ask_blindly(opening: str, history: History, rng: np.random.Generator) -> str:
    """A random question or a random animal, ignoring every answer."""
    return str(rng.choice(ATTRIBUTES)) + "?" if rng.random() < 0.5 else str(rng.choice(list(ANIMALS)))


class TwentyQuestions(_Game):
    """Find the hidden animal with yes/no questions (see the module docstring)."""

    name = "twenty_questions"
    max_turns = 6
    behaviours = {"expert": _ask_all, "some": _ask_some, "random": _ask_blindly}
    CORPUS_MIX = {"expert": 0.15, "some": 0.25, "random": 0.6}

    def _start(self, rng: np.random.Generator) -> str:
        self.animal = str(list(ANIMALS)[int(rng.integers(0, len(ANIMALS)))])
        return "guess the animal"

    def _move(self, word: str) -> tuple[str, bool, bool]:
        if word in ATTRIBUTES:
            return ("yes" if ANIMALS[self.animal][ATTRIBUTES.index(word)] else "no"), False, False
        if word in ANIMALS:
            return ("correct", True, False) if word == self.animal else ("wrong", False, False)
        return "invalid", False, True


# --- grid walk ------------------------------------------------------------------------------------------------------

def _positions(opening: str, history: History) -> tuple[int, int]:
    match = re.fullmatch(r"at (\d+) goal (\d+)", opening)
    at, goal = int(match.group(1)), int(match.group(2))
    for _, reply in history:
        moved = re.fullmatch(r"at (\d+)", reply)
        if moved:
            at = int(moved.group(1))
    return at, goal


def _walker(toward: float) -> Policy:
    def policy(opening: str, history: History, rng: np.random.Generator) -> str:
        at, goal = _positions(opening, history)
        right = goal > at
        if rng.random() >= toward:
            right = not right
        return "right" if right else "left"
    policy.__doc__ = f"Step toward the goal with probability {toward}, else away from it."
    return policy


class GridWalk(_Game):
    """Walk a corridor to the goal with "left" / "right" (see the module docstring)."""

    name = "grid_walk"
    max_turns = 8
    behaviours = {"expert": _walker(1.0), "biased": _walker(0.65), "random": _walker(0.5)}
    CORPUS_MIX = {"expert": 0.1, "biased": 0.2, "random": 0.7}

    def __init__(self, size: int = 8, max_turns: int | None = None, turn_penalty: float = 0.0, system_prompt: str | None = None):
        if int(size) < 2:
            raise ConfigError(f"grid_walk: size must be at least 2, got {size}")
        self.size = int(size)
        super().__init__(max_turns, turn_penalty, system_prompt)

    def _start(self, rng: np.random.Generator) -> str:
        self.at, self.goal = (int(x) for x in rng.choice(self.size, size=2, replace=False))
        return f"at {self.at} goal {self.goal}"

    def _move(self, word: str) -> tuple[str, bool, bool]:
        if word not in ("left", "right"):
            return "invalid", False, True
        self.at = min(self.size - 1, max(0, self.at + (1 if word == "right" else -1)))
        return f"at {self.at}", self.at == self.goal, False


# --- resolver ---------------------------------------------------------------------------------------------------------

TEXT_GAMES: dict[str, type[_Game]] = {cls.name: cls for cls in (GuessNumber, TwentyQuestions, GridWalk)}
PREFIXES = ("text:", "textarena:")


def is_text_env(spec: str) -> bool:
    """True for "text:<built-in>", "text:<module>:<Class>" and "textarena:<id>" specs."""
    return isinstance(spec, str) and spec.startswith(PREFIXES)


def make_text_env(spec: str, **options) -> TextEnv:
    """"text:<name>" -> the built-in task (options go to its class, e.g. max_number=32); "text:<module>:<Class>" -> a
    user's TextEnv class (orl.text.conversation.TextEnv); "textarena:<id>" -> a TextArena game through
    orl.envs.textarena (imported only then)."""
    if isinstance(spec, str) and spec.startswith("textarena:"):
        from orl.envs.textarena import TextArenaEnv

        return TextArenaEnv(spec[len("textarena:"):], **options)
    if isinstance(spec, str) and spec.startswith("text:"):
        name = spec[len("text:"):]
        if name in TEXT_GAMES:
            make = TEXT_GAMES[name]
        elif ":" in name:  # a user's own TextEnv class: text:package.module:ClassName
            make = _import_env_class(spec, *name.split(":", 1))
        else:
            make = None
        if make is not None:
            try:
                return make(**options)
            except TypeError as exc:
                raise ConfigError(f"text environment {spec!r}: {exc}") from exc
    raise ConfigError(f"unknown text environment {spec!r}: the built-ins are "
                      f"{', '.join('text:' + n for n in TEXT_GAMES)}; TextArena games are 'textarena:<id>'; your own class is "
                      "'text:package.module:ClassName'")


def _import_env_class(spec: str, module_name: str, class_name: str):
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"text environment {spec!r}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from exc
    make = getattr(module, class_name, None)
    if make is None or not all(hasattr(make, name) for name in ("reset", "step")):
        raise ConfigError(f"text environment {spec!r}: {module_name} has no class {class_name} with reset(seed) and step(text)")
    return make
