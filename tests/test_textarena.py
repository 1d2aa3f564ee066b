"""TextArena's single-player games as orl text environments (envs/textarena.py): replies are only the game's new
messages, reward and success are the game's own, rejected moves are flagged, the same seed replays the same episode
(even with other environments stepped in between), and unusable ids are one ConfigError."""
import random
import sys

import pytest

pytest.importorskip("textarena", reason="pip install textarena (the [dev] and [games] extras)")

from orl.envs.textarena import TextArenaEnv

from orl.errors import ConfigError

HIGHER, LOWER = "The target number is higher.", "The target number is lower."


def target(env: TextArenaEnv) -> int:
    return env.game.state.game_state["game_number"]


def test_guess_the_number_won_by_bisection_on_the_replies():
    from textarena.agents.basic_agents import STANDARD_GAME_PROMPT

    env = TextArenaEnv("GuessTheNumber-v0")
    assert env.max_turns == 11 and env.system_prompt == STANDARD_GAME_PROMPT
    opening, _ = env.reset(seed=3)
    assert opening.startswith("You are Player 0. You are playing Guess The Number.") and opening.endswith("Enter your guess.")
    low, high = 1, 20
    for _ in range(env.max_turns):
        guess = (low + high) // 2
        reply, reward, terminated, truncated, info = env.step(f"I will try [{guess}].")
        assert not info["invalid"] and not truncated
        if terminated:
            break
        assert reply in (HIGHER, LOWER) and reward == 0.0 and "success" not in info  # no echo of the guess, no history
        low, high = (guess + 1, high) if reply == HIGHER else (low, guess - 1)
    assert terminated and guess == target(env)
    assert reward == 1.0 and info["success"] is True and reply == "Congratulations! You guessed the correct number."


def test_guess_the_number_lost_at_the_games_turn_limit_with_its_completion_reward():
    env = TextArenaEnv("GuessTheNumber-v0")
    env.reset(seed=5)
    wrong = [n for n in range(1, 21) if n != target(env)][:env.max_turns]  # TextArena takes 11 guesses (limit 10)
    for guess in wrong[:-1]:
        reply, reward, terminated, truncated, info = env.step(f"[{guess}]")
        assert reply in (HIGHER, LOWER) and reward == 0.0 and not terminated and not truncated
    reply, reward, terminated, truncated, info = env.step(f"[{wrong[-1]}]")
    assert terminated and not truncated and info["success"] is False and not info["invalid"]
    assert reward == pytest.approx(1 - abs(wrong[-1] - target(env)) / 19)  # TextArena's percentage completion
    assert reply.endswith(f"The turn limit has been reached. Guess: {wrong[-1]}, Target: {target(env)}")


def test_invalid_moves_are_flagged_retried_within_the_allowance_then_end_the_game():
    env = TextArenaEnv("GuessTheNumber-v0")
    env.reset(seed=3)
    wrong = 1 if target(env) != 1 else 2
    reply, reward, terminated, truncated, info = env.step("five, I think")
    assert info["invalid"] and reward == 0.0 and not terminated and not truncated
    assert reply.startswith("You attempted an invalid move. Reason: Invalid move format.")
    reply, _, terminated, _, info = env.step(f"[{wrong}]")  # a valid move resets the game's error count
    assert not info["invalid"] and reply in (HIGHER, LOWER) and not terminated
    assert env.step(f"[{wrong}]")[4]["invalid"]  # already guessed: rejected, retry allowed
    reply, reward, terminated, truncated, info = env.step("no idea")  # a second rejection in a row ends the game
    assert terminated and info["invalid"] and info["success"] is False
    assert reply.startswith("Invalid Move: Invalid move format.")
    assert reward == pytest.approx(1 - abs(wrong - target(env)) / 19)  # the game's penalty is its completion measure
    with pytest.raises(RuntimeError, match="reset"):
        env.step("[3]")


def test_rejected_moves_use_up_max_turns_and_truncate():
    env = TextArenaEnv("GuessTheNumber-v0")
    env.reset(seed=3)
    wrong = iter(n for n in range(1, 21) if n != target(env))
    for turn in range(1, env.max_turns + 1):
        action = "pass" if turn % 2 else f"[{next(wrong)}]"  # 6 rejected + 5 accepted moves: the game is not over
        _, reward, terminated, truncated, info = env.step(action)
        assert not terminated and reward == 0.0 and truncated == (turn == env.max_turns)
    assert info["success"] is False


def test_max_turns_goes_to_the_game_where_it_takes_one_and_caps_it_elsewhere():
    short = TextArenaEnv("GuessTheNumber-v0", max_turns=4)
    opening, _ = short.reset(seed=3)
    assert short.max_turns == 5 and "within 4 turns" in opening  # the game ends on the move after its limit
    outcomes = [short.step(f"[{n}]") for n in [n for n in range(1, 21) if n != target(short)][:5]]
    assert [o[2] for o in outcomes] == [False] * 4 + [True] and not outcomes[-1][3] and outcomes[-1][1] > 0

    lake = TextArenaEnv("FrozenLake-v0", max_turns=3)  # FrozenLake's own limit (100) is fixed
    lake.reset(seed=0)
    outcomes = [lake.step(action) for action in ("[right]", "[left]", "[right]")]
    assert lake.max_turns == 3 and [o[3] for o in outcomes] == [False, False, True] and not outcomes[-1][2]


def hanoi(disks: int, source: str, target_tower: str, spare: str) -> list[str]:
    if disks == 0:
        return []
    return hanoi(disks - 1, source, spare, target_tower) + [f"[{source} {target_tower}]"] + hanoi(disks - 1, spare, target_tower, source)


def test_tower_of_hanoi_solved_by_the_optimal_moves_after_a_rejected_one():
    env = TextArenaEnv("TowerOfHanoi-v0")
    assert env.max_turns == 15
    opening, _ = env.reset(seed=0)
    assert "Tower of Hanoi with 3 disks" in opening and "A: [3, 2, 1]" in opening  # the prompt and the first board
    reply, reward, terminated, truncated, info = env.step("[B C]")
    assert info["invalid"] and not terminated and "You tried to move a disk from an empty tower." in reply
    moves = hanoi(3, "A", "C", "B")
    for move in moves[:-1]:
        reply, reward, terminated, truncated, info = env.step(f"Next: {move}")
        assert not info["invalid"] and not terminated and reward == 0.0 and reply.startswith("You moved disk")
    reply, reward, terminated, truncated, info = env.step(moves[-1])
    assert terminated and not truncated and reward == 1.0 and info["success"] is True
    assert reply.startswith("You moved disk 1 from A to C.") and "C: [3, 2, 1]" in reply
    assert reply.endswith("Congratulations! You solved the Tower of Hanoi puzzle.")


def test_same_seed_same_episode_even_with_other_envs_and_the_callers_random_in_between():
    actions = ["[Up]", "[Left]", "[Down]", "[Right]"] * 4  # 2048 draws a new tile from `random` after every move

    def transcript(env: TextArenaEnv, seed: int) -> list[str]:
        return [env.reset(seed=seed)[0]] + [env.step(action)[0] for action in actions]

    alone = transcript(TextArenaEnv("2048-v0"), seed=1)
    first, second = TextArenaEnv("2048-v0"), TextArenaEnv("2048-v0")
    random.seed(123)
    caller_state = random.getstate()
    interleaved, other = [first.reset(seed=1)[0]], [second.reset(seed=2)[0]]
    assert random.getstate() == caller_state  # reset leaves the caller's random stream alone
    for action in actions:
        interleaved.append(first.step(action)[0])
        random.random()
        other.append(second.step(action)[0])
    assert interleaved == alone and other != alone

    guess_a, guess_b = TextArenaEnv("GuessTheNumber-v0"), TextArenaEnv("GuessTheNumber-v0-train")  # -train: unwrapped
    assert guess_a.reset(seed=7) == guess_b.reset(seed=7)
    assert [guess_a.step(a)[0] for a in ("[10]", "x", "[3]")] == [guess_b.step(a)[0] for a in ("[10]", "x", "[3]")]
    targets = []
    for seed in range(10):
        guess_a.reset(seed=seed)
        targets.append(target(guess_a))
    assert len(set(targets)) >= 5

    lake = TextArenaEnv("FrozenLake-v0")
    boards = [lake.reset(seed=seed)[0] for seed in range(5)]
    assert len(set(boards)) > 1 and lake.reset(seed=3)[0] == boards[3]


def test_unusable_games_are_one_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"no game 'GuessTheNumbr-v0'.*GuessTheNumber-v0"):
        TextArenaEnv("GuessTheNumbr-v0")
    with pytest.raises(ConfigError, match="TicTacToe-v0 is not a single-player game"):
        TextArenaEnv("TicTacToe-v0")
    with pytest.raises(ConfigError, match="rejected the options"):
        TextArenaEnv("GuessTheNumber-v0", colour="red")
    monkeypatch.setitem(sys.modules, "textarena", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'orl\[games\]'"):
        TextArenaEnv("GuessTheNumber-v0")


def test_games_that_need_nltk_data_name_the_download(monkeypatch):
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("corpora/words")
        pytest.skip("the NLTK words corpus is installed here")
    except LookupError:
        pass
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)  # Wordle's import would try the network
    with pytest.raises(ConfigError, match=r"Wordle-v0 needs NLTK data.*nltk\.download\('words'\)"):
        TextArenaEnv("Wordle-v0")


def test_grpo_trains_in_a_textarena_game_through_orl_train(tmp_path):
    """orl-train agent=grpo env=textarena:GuessTheNumber-v0 with a model whose context holds the game's opening (a random
    toy Llama with 1024 positions; the embedded tiny LM's 128 do not, which is refused up front)."""
    from hydra import compose, initialize_config_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    from orl.apps.cli import CONFIG_DIR, run_train
    from tests.lm_archs import _tokenizer

    tokenizer = _tokenizer("llama")
    tokenizer.model_max_length = 1024
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["agent=grpo", "env=textarena:GuessTheNumber-v0", f"lm.model={tmp_path / 'model'}",
                                                      "lm.stop=the", "agent.lr=1e-3", "agent.num_generations=2", "agent.max_completion_length=3",
                                                      "batch_size=1", "steps=1", "eval.every=1", "lm.num_eval_episodes=2", "log.progress=false",
                                                      "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"])
        summary = run_train(cfg)
    # a random model never writes "[n]": TextArena's invalid-move rule ends each game after its second invalid move
    assert summary["turns"] == 2.0 and summary["success"] == 0.0
