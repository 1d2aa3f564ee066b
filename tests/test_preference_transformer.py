"""Preference Transformer (issue 13): causal rewards, non-causal preference attention, the official
"last"-mode relabelling, learning a known reward, and the round trip through orl-prefs' model file."""
import numpy as np
import pytest
import torch

from orl.prefs.transformer import PreferenceTransformer, PreferenceTransformerConfig, train_preference_transformer
from orl.prefs.store import load_reward_model, relabel, save_reward_model
from orl.prefs.labels import scripted_preferences
from tests.test_preferences import pendulum_like

SMALL = dict(embed_dim=32, layers=2, heads=1, dropout=0.0, preference_attention_dim=16)


def test_rewards_are_causal_and_the_weighted_sum_sees_the_whole_segment():
    torch.manual_seed(0)
    model = PreferenceTransformer(3, 1, PreferenceTransformerConfig(**SMALL)).eval()
    obs, actions = torch.randn(2, 6, 3), torch.randn(2, 6, 1)
    weighted, reward = model(obs, actions)
    assert weighted.shape == reward.shape == (2, 6)
    changed = obs.clone()
    changed[:, 4] += 1.0  # a change at step 4
    weighted_2, reward_2 = model(changed, actions)
    torch.testing.assert_close(reward_2[:, :4], reward[:, :4])        # r_t for t < 4 cannot see it
    assert not torch.allclose(reward_2[:, 4:], reward[:, 4:])
    assert not torch.allclose(weighted_2[:, :4], weighted[:, :4])     # z_t attends over the whole segment
    torch.testing.assert_close(model.score(obs, actions), weighted.mean(-1))


def test_relabelling_is_the_official_last_mode_window():
    """Reward of t = r at the last position of the window of `window` steps that ends at t, cut at the start of
    t's trajectory (the official padded window, whose padding is masked out): computed one window at a time."""
    torch.manual_seed(1)
    data = pendulum_like(130)   # trajectories of 50 steps: 50, 50, 30
    model = PreferenceTransformer(3, 1, PreferenceTransformerConfig(**SMALL, window=7)).eval()
    fast = model.predict_dataset(data, batch_size=16)
    episodes = data.episode_ids()
    obs, actions = torch.as_tensor(data.observations), torch.as_tensor(data.actions)
    for t in [0, 1, 5, 6, 7, 30, 49, 50, 51, 56, 57, 99, 100, 106, 129]:
        start = t
        while start > 0 and episodes[start - 1] == episodes[t] and t - start + 1 < 7:
            start -= 1
        with torch.no_grad():
            _, reward = model(obs[None, start:t + 1], actions[None, start:t + 1])
        assert fast[t] == pytest.approx(reward[0, -1].item(), abs=1e-5), t


def test_learns_a_known_reward_and_round_trips_through_the_reward_model_file(tmp_path):
    data = pendulum_like(3000)
    pairs = scripted_preferences(data, queries=400, length=10, seed=0)
    cfg = PreferenceTransformerConfig(**SMALL, epochs=30, eval_every=5, held_out=0.2, window=10, lr=3e-4)
    model, metrics = train_preference_transformer(data, pairs, cfg)
    assert not model.training                           # returned ready to relabel: dropout off
    assert metrics["held_out_accuracy"] > 0.75         # chance is 0.5 (0.84 when written)
    assert metrics["reward_correlation"] > 0.3         # the per-step reward is not what PT fits exactly (0.51)
    save_reward_model(tmp_path / "reward_model.pt", model, pairs, metrics)
    loaded, record = load_reward_model(tmp_path)
    assert isinstance(loaded, PreferenceTransformer) and record["kind"] == "preference_transformer"
    np.testing.assert_allclose(relabel(data, loaded).rewards, model.predict_dataset(data), rtol=1e-5, atol=1e-6)


def test_orl_prefs_reward_model_transformer(tmp_path, capsys):
    import json

    from orl.apps.prefs import prefs_main

    data = pendulum_like(600)
    path = tmp_path / "known.npz"
    np.savez(path, observations=data.observations, actions=data.actions, rewards=data.rewards, next_observations=data.next_observations,
             terminals=data.terminals, timeouts=data.timeouts)
    prefs_main(["label", str(path), "--queries", "60", "--length", "8", "--out", str(tmp_path / "prefs.npz")])
    prefs_main(["reward", str(path), str(tmp_path / "prefs.npz"), "--model", "transformer", "--max-epochs", "2", "--window", "5",
                "--out", str(tmp_path / "pt")])
    assert "reward model ->" in capsys.readouterr().out
    model, record = load_reward_model(tmp_path / "pt")
    assert isinstance(model, PreferenceTransformer) and model.cfg.window == 5 and model.cfg.epochs == 2
    assert json.loads((tmp_path / "pt" / "metrics.json").read_text())["held_out_queries"] == 6
