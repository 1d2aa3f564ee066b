"""TextArena's single-player games as orl multi-turn text environments (`orl.text.conversation.TextEnv`).

TextArena (https://github.com/LeonGuertler/TextArena; Guertler et al. 2025, "TextArena", arXiv:2504.11442) is a
collection of 100+ text games behind one gym-like API; `pip install 'orl[games]'` installs it (textarena>=0.7.4).

    env = TextArenaEnv("GuessTheNumber-v0")
    opening, info = env.reset(seed=3)
    reply, reward, terminated, truncated, info = env.step("My guess: [10]")

Checked against textarena 0.7.4 (tests/test_textarena.py): GuessTheNumber-v0, TowerOfHanoi-v0, FrozenLake-v0 and
2048-v0. Any id whose game keeps a `textarena.SinglePlayerState` works the same way (Mastermind, Minesweeper, Sudoku,
Sokoban, LightsOut, ...); multi-player games are refused, and so are games that cannot start offline (Wordle,
Hangman, WordLadder and WordSearch need NLTK corpora; GuessWho and TwentyQuestions need an LLM behind
OPENROUTER_API_KEY; Klondike and UltimateTexasHoldem use Python 3.12 syntax).

Text. The game is built without TextArena's observation wrappers (the id's "-raw" registration; the wrappers re-send
the whole history every turn, which the conversation already holds). The opening is the game's first messages (its
prompt, and the board where the game has one); each reply is only the messages the game sent since the agent's last
turn, without the agent's own action echoed back, one message per line (a board is one multi-line message). When the
game ends, its closing reason (e.g. "Congratulations! You guessed the correct number.", or why a move ended the game)
is the reply's last line: TextArena records it as the outcome, not as a message.

Reward and success. The reward is 0 on every turn but the last, where it is the game's own final reward
(`env.close()`): in TextArena's single-player games 1 for a solved game, else the game's measure of how far the
player got (GuessTheNumber: 1 - |last guess - target| / range; TowerOfHanoi: the fraction of disks in place).
info["success"] at the end is `reward >= 1` (solved); for the few score-valued games (Blackjack: the fraction of
hands won; Set: the score) it means the best outcome. info["invalid"] is True on a move the game rejected: within the
game's error allowance (one for most games) the game says why and waits for another move; past it the game ends
with the reward the game gives for that (GuessTheNumber: its completion measure, not -1). info["reason"] carries
TextArena's outcome text at the end.

Turns. TextArena checks a game's turn limit before counting the move being made, so its games accept one move more
than the limit they state (GuessTheNumber-v0 says 10 guesses and ends, with its completion reward, on the 11th
wrong one; TowerOfHanoi-v0: 14 -> 15 moves; FrozenLake-v0: 100 -> 101). `max_turns` is that limit + 1, so the game's
own end comes first. A `max_turns` given here is passed to the game where the game takes it as an option (its prompt
then states it, and `max_turns` becomes it + 1 as above); where the game's limit is fixed or absent it caps the
agent's turns (truncated=True at the last one, reward 0). Games without a limit get DEFAULT_MAX_TURNS. TextArena
counts only accepted moves, while `max_turns` counts every agent turn: rejected moves use up turns, and an agent
that runs out that way gets truncated=True with reward 0 before the game would have ended.

Determinism. TextArena seeds Python's global `random` (its State calls random.seed(seed)) and draws from it during
reset and, for some games (2048 spawns tiles), during steps. Each TextArenaEnv keeps its own `random` state: reset
and step swap it in and restore the caller's afterwards, so the same seed and actions give the same episode however
many environments are stepped in between, and the caller's random stream is left as it was.

System prompt: TextArena's own LLM agents (textarena/agents/basic_agents.py) send STANDARD_GAME_PROMPT as the system
message; `system_prompt` is that constant (set it to None for none). The opening already explains the game.

verifiers (PyPI `verifiers` 0.4.0, read, not used): 0.4.0 no longer has `MultiTurnEnv.env_response(messages, state)` /
`is_completed`; an environment is an `Env` whose `async run(task, agents)` owns the control flow and pulls each model
turn with `await interaction.turn(user_text)`, recording rewards on the interaction's trace (its own TextArena taskset
does exactly this, seeding the global `random`). Wrapping one in reset/step means inverting that control: run `run()`
as a coroutine on an event loop with a stand-in agent whose `turn()` suspends until `step(action)` supplies the reply
(a pair of queues), reset(seed) choosing the seed-th task of the `Taskset.load()` iterator, and the reward read from
the trace when `run()` returns. The older MultiTurnEnv API would need less: keep the message list and state dict in
the adapter, append each action as an assistant message, and return the new messages from `env_response`.
"""
from __future__ import annotations

import difflib
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orl.errors import ConfigError

DEFAULT_MAX_TURNS = 50  # games without their own turn limit (2048, Blackjack, PegJump, RushHour)
# textarena.agents.basic_agents.STANDARD_GAME_PROMPT, the system message of TextArena's own LLM agents.
STANDARD_GAME_PROMPT = ("You are a competitive game player. Make sure you read the game instructions carefully, "
                        "and always follow the required format.")
SINGLE_PLAYER_EXAMPLES = ("GuessTheNumber-v0", "TowerOfHanoi-v0", "FrozenLake-v0", "Mastermind-v0", "Minesweeper-v0",
                          "Sudoku-v0", "2048-v0")


def _textarena():
    try:
        import textarena
    except ImportError as exc:
        raise ConfigError(f"TextArena games need the textarena package, which cannot be imported ({exc}): "
                          "pip install 'orl[games]'") from exc
    return textarena


def _nltk_error(env_id: str, exc: LookupError) -> ConfigError:
    # nltk's LookupError text names the missing resource as "nltk.download('words')"
    found = re.search(r"nltk\.download\('([^']+)'\)", str(exc))
    resource = found.group(1) if found else "words"
    return ConfigError(f"TextArena's {env_id} needs NLTK data that is not installed here ({resource!r}): run "
                       f"python -c \"import nltk; nltk.download('{resource}')\" where the network is reachable "
                       "(or copy an nltk_data folder over), then retry")


class TextArenaEnv:
    """A TextArena single-player game as a `TextEnv`: reset(seed) -> (opening, info); step(text) -> (reply, reward,
    terminated, truncated, info). `game` is the TextArena environment itself (its `state` holds the game state)."""

    def __init__(self, env_id: str, max_turns: int | None = None, **env_kwargs: Any):
        ta = _textarena()
        registry = ta.envs.registration.ENV_REGISTRY
        if env_id not in registry:
            close = difflib.get_close_matches(env_id, list(registry), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"TextArena has no game {env_id!r}: {hint}single-player ids include "
                              f"{', '.join(SINGLE_PLAYER_EXAMPLES)} (textarena.envs.registration.ENV_REGISTRY lists all)")
        game_takes_max_turns = "max_turns" in registry[env_id].kwargs
        if max_turns is not None and game_takes_max_turns:
            env_kwargs["max_turns"] = max_turns  # the game's own limit, so its end-of-game reward applies
        self.env_id = env_id
        self.game = self._build(ta, env_kwargs)
        self._action_echo = ta.ObservationType.PLAYER_ACTION  # the agent's own text, sent back (some games as GAME)
        self.system_prompt: str | None = STANDARD_GAME_PROMPT
        self._random_state = random.getstate()  # replaced by the seed at every reset
        self._agent_turns = 0
        self._done = True
        # A first reset shows whether the game is single-player and runs offline, and gives its turn limit.
        try:
            self.reset(seed=0)
        except LookupError as exc:
            raise _nltk_error(env_id, exc) from exc
        except (AssertionError, ValueError) as exc:  # TextArena's states assert their player count
            raise ConfigError(f"TextArena's {env_id} is not a single-player game ({exc}): use a single-player id "
                              f"such as {', '.join(SINGLE_PLAYER_EXAMPLES)}") from exc
        if not isinstance(self.game.state, ta.SinglePlayerState):
            raise ConfigError(f"TextArena's {env_id} is not a single-player game (it accepts one player but keeps a "
                              f"{type(self.game.state).__name__}): use a single-player id such as "
                              f"{', '.join(SINGLE_PLAYER_EXAMPLES)}")
        game_limit = self.game.state.max_turns
        limits = [] if game_limit is None else [game_limit + 1]  # the game ends on the move after its limit
        if max_turns is not None and not game_takes_max_turns:
            limits.append(max_turns)
        self.max_turns: int = min(limits) if limits else DEFAULT_MAX_TURNS

    def _build(self, ta: Any, env_kwargs: dict[str, Any]) -> Any:
        """The game without TextArena's observation/action wrappers."""
        registry = ta.envs.registration.ENV_REGISTRY
        raw_id = f"{self.env_id}-raw" if f"{self.env_id}-raw" in registry else self.env_id
        try:
            game = ta.make(raw_id, **env_kwargs)
        except LookupError as exc:
            raise _nltk_error(self.env_id, exc) from exc
        except TypeError as exc:
            raise ConfigError(f"TextArena's {self.env_id} rejected the options {env_kwargs} ({exc}): pass only the "
                              f"game's own constructor arguments") from exc
        except (ImportError, SyntaxError, ValueError, OSError) as exc:
            raise ConfigError(f"TextArena could not build {self.env_id} ({type(exc).__name__}: {exc}): games that "
                              "need an LLM (OPENROUTER_API_KEY), files missing from the textarena wheel or a newer "
                              "Python cannot run here; pick another single-player game") from exc
        while isinstance(game, ta.Wrapper):  # ids without a -raw twin (the -train variants): the same game, wrapped
            game = game.env
        return game

    @contextmanager
    def _own_random(self) -> Iterator[None]:
        """Run the game on this environment's `random` state, leaving the caller's as it was."""
        outer = random.getstate()
        random.setstate(self._random_state)
        try:
            yield
        finally:
            self._random_state = random.getstate()
            random.setstate(outer)

    def _game_messages(self) -> list[str]:
        """The game's messages since the last call (TextArena hands each message out once), without the agent's
        own actions."""
        _, messages = self.game.get_observation()
        return [text for _, text, kind in messages if kind != self._action_echo]

    def reset(self, seed: int) -> tuple[str, dict]:
        with self._own_random():
            random.seed(seed)  # TextArena's State seeds `random` too; this also covers games that skip it
            self.game.reset(num_players=1, seed=seed)
        self._agent_turns = 0
        self._done = False
        return "\n".join(self._game_messages()), {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError(f"{self.env_id}: step() after the episode ended; call reset(seed) first")
        state = self.game.state
        accepted_moves = state.turn
        with self._own_random():
            self.game.step(action)
        self._agent_turns += 1
        lines = self._game_messages()
        # TextArena advances state.turn only on an accepted move, and flags a move that ended the game as invalid.
        info: dict[str, Any] = {"invalid": bool(state.turn == accepted_moves or state.game_info[0]["invalid_move"])}
        terminated = bool(state.done)
        truncated = not terminated and self._agent_turns >= self.max_turns
        reward = 0.0
        if terminated:
            rewards, game_info = self.game.close()
            reward = float(rewards[0])
            reason = game_info[0].get("reason")
            if reason and reason not in lines:
                lines.append(str(reason))
            info.update(success=reward >= 1.0, reason=reason)
        elif truncated:
            info["success"] = False
        self._done = terminated or truncated
        return "\n".join(lines), reward, terminated, truncated, info
