"""CPL (issue 13): the loss on known values, lambda on the dispreferred score only, the BC -> CPL switch,
and a run from a label file through orl-train."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import orl
from orl.agents.cpl import cpl_loss
from orl.prefs.labels import PreferencePairs, scripted_preferences
from orl.prefs.buffers import SegmentPairBatch, SegmentPairBuffer
from tests.test_preferences import pendulum_like

SPACE_OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
SPACE_ACT = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def softplus(x):
    return math.log1p(math.exp(x))


def test_cpl_loss_is_its_closed_form():
    s1, s2 = torch.tensor([2.0]), torch.tensor([1.0])
    assert cpl_loss(s1, s2, torch.tensor([1.0]), 0.5).item() == pytest.approx(softplus(-(2.0 - 0.5 * 1.0)))
    assert cpl_loss(s1, s2, torch.tensor([0.0]), 0.5).item() == pytest.approx(softplus(-(1.0 - 0.5 * 2.0)))
    tie = 0.5 * softplus(-(2.0 - 0.5)) + 0.5 * softplus(-(1.0 - 1.0))
    assert cpl_loss(s1, s2, torch.tensor([0.5]), 0.5).item() == pytest.approx(tie)
    # lambda = 1: the Bradley-Terry loss on the scores
    from orl.prefs.losses import preference_loss

    assert cpl_loss(s1, s2, torch.tensor([0.7]), 1.0).item() == pytest.approx(preference_loss(s1, s2, 0.7).item())


def test_lambda_scales_only_the_dispreferred_score():
    s1, s2 = torch.tensor([2.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    cpl_loss(s1, s2, torch.tensor([1.0]), 0.3).backward()  # segment 1 preferred
    slope = torch.sigmoid(torch.tensor(-(2.0 - 0.3 * 1.0))).item()
    assert s1.grad.item() == pytest.approx(-slope)          # the preferred score enters unscaled
    assert s2.grad.item() == pytest.approx(0.3 * slope)     # the dispreferred one scaled by lambda


def segment_batch(batch=8, length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SegmentPairBatch(torch.randn(batch, 2, length, 3, generator=g), torch.rand(batch, 2, length, 1, generator=g) * 2 - 1,
                            torch.randint(0, 2, (batch,), generator=g).float())


def test_bc_steps_then_cpl_with_a_fresh_optimizer():
    import copy

    torch.manual_seed(0)
    agent = orl.make_agent("cpl", SPACE_OBS, SPACE_ACT, {"bc_steps": 3, "alpha": 1.0, "bc_coef": 0.0, "deterministic": False,
                                                         "dropout": 0.0, "lr_warmup_steps": 0})
    batch = segment_batch()
    # a BC-phase step is an Adam step on the BC loss alone (no CPL term)
    replica = copy.deepcopy(agent.nets["actor"])
    adam = torch.optim.Adam(replica.parameters(), lr=agent.cfg.lr)
    (-replica.log_prob(batch.obs, batch.actions).mean()).backward()
    adam.step()
    first_optimizer = agent.optimizers["actor"]
    assert agent.update(batch)["bc_phase"].item() == 1.0
    for mine, theirs in zip(agent.nets["actor"].parameters(), replica.parameters()):
        torch.testing.assert_close(mine, theirs)
    assert first_optimizer.state  # moments accumulated during BC
    for _ in range(2):
        agent.update(batch)
    assert agent.optimizers["actor"] is not first_optimizer and not agent.optimizers["actor"].state  # rebuilt at the switch
    # the first CPL step is a fresh Adam step on the CPL loss
    replica = copy.deepcopy(agent.nets["actor"])
    adam = torch.optim.Adam(replica.parameters(), lr=agent.cfg.lr)
    score = replica.log_prob(batch.obs, batch.actions).sum(-1)
    cpl_loss(score[:, 0], score[:, 1], batch.labels, agent.cfg.contrastive_bias).backward()
    adam.step()
    assert agent.update(batch)["bc_phase"].item() == 0.0
    for mine, theirs in zip(agent.nets["actor"].parameters(), replica.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_lr_restarts_at_the_switch_with_the_official_linear_warmup():
    """Constant lr through BC; then lr * multiplier * min(1, (t - bc_steps + 1) / warmup), as the official
    LambdaLR created at the switch and stepped once before the first CPL update."""
    agent = orl.make_agent("cpl", SPACE_OBS, SPACE_ACT, {"bc_steps": 2, "lr": 1e-3, "lr_warmup_steps": 4, "lr_multiplier": 0.5, "dropout": 0.0})
    batch = segment_batch()
    rates = [agent.update(batch)["lr"].item() for _ in range(8)]
    assert rates == pytest.approx([1e-3, 1e-3, 0.5e-3 / 4, 0.5e-3 * 2 / 4, 0.5e-3 * 3 / 4, 0.5e-3, 0.5e-3, 0.5e-3])


def test_cpl_kl_scores_against_the_frozen_bc_policy():
    torch.manual_seed(0)
    agent = orl.make_agent("cpl_kl", SPACE_OBS, SPACE_ACT, {"bc_steps": 2, "dropout": 0.0, "hidden": [32, 32]})
    assert agent.cfg.reference and agent.cfg.alpha == 0.2 and agent.cfg.contrastive_bias == 0.75  # official CPL-KL defaults
    batch = segment_batch()
    for _ in range(2):
        agent.update(batch)
    actor, reference = agent.nets["actor"], agent.nets["reference"]
    for mine, ref in zip(actor.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, ref)   # the reference is the policy at the end of BC
        assert not ref.requires_grad
    # at the switch pi == pi_ref, so every score is 0 and the loss is softplus(0) = log 2 whatever the labels
    assert agent.update(batch)["cpl_loss"].item() == pytest.approx(math.log(2.0))
    frozen = [p.clone() for p in reference.parameters()]
    for _ in range(3):
        agent.update(batch)
    for before, after in zip(frozen, reference.parameters()):
        torch.testing.assert_close(before, after)   # pi_ref never trains
    # the score is alpha * sum_t (log pi - log pi_ref)
    with torch.no_grad():
        advantage = agent.log_prob(batch.obs, batch.actions) - agent.log_prob(batch.obs, batch.actions, reference)
        score = 0.2 * advantage.sum(-1)
        expected = cpl_loss(score[:, 0], score[:, 1], batch.labels, 0.75)
    agent.optimizers["actor"].param_groups[0]["lr"] = 0.0
    assert agent.update(batch)["cpl_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(orl.errors.ConfigError, match="bc_steps"):
        orl.make_agent("cpl_kl", SPACE_OBS, SPACE_ACT, {"bc_steps": 0})


def test_discounted_score_and_bc_on_preferred_segments_only():
    batch = segment_batch(batch=6, length=3)
    batch.labels[:] = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    agent = orl.make_agent("cpl", SPACE_OBS, SPACE_ACT, {"bc_steps": 10, "bc_data": "preferred", "dropout": 0.0})
    with torch.no_grad():
        log_prob = agent.log_prob(batch.obs, batch.actions)          # (6, 2, 3)
    per_segment = log_prob.mean(-1)
    preferred = [per_segment[0, 0], per_segment[1, 1], per_segment[2, 0], per_segment[2, 1], per_segment[3, 0], per_segment[4, 1], per_segment[5, 0]]
    assert agent.update(batch)["bc_loss"].item() == pytest.approx(-torch.stack(preferred).mean().item(), rel=1e-5)

    agent = orl.make_agent("cpl", SPACE_OBS, SPACE_ACT, {"bc_steps": 0, "discount": 0.5, "alpha": 1.0, "contrastive_bias": 1.0, "dropout": 0.0})
    with torch.no_grad():
        log_prob = agent.log_prob(batch.obs, batch.actions)
        score = (log_prob * torch.tensor([1.0, 0.5, 0.25])).sum(-1)
    assert agent.update(batch)["cpl_loss"].item() == pytest.approx(cpl_loss(score[:, 0], score[:, 1], batch.labels, 1.0).item(), rel=1e-5)


def test_cpl_kl_resumed_across_the_switch_equals_an_uninterrupted_run():
    batches = [segment_batch(seed=seed) for seed in range(7)]
    torch.manual_seed(1)
    settings = {"bc_steps": 3, "lr_warmup_steps": 2, "dropout": 0.0, "hidden": [16, 16], "lr": 1e-2}
    straight = orl.make_agent("cpl_kl", SPACE_OBS, SPACE_ACT, settings)
    first = orl.make_agent("cpl_kl", SPACE_OBS, SPACE_ACT, settings)
    first.load_state_dict(straight.state_dict())
    for batch in batches:
        straight.update(batch)
    for batch in batches[:4]:       # past the switch: fresh optimizer, reference set, warmup started
        first.update(batch)
    resumed = orl.make_agent("cpl_kl", SPACE_OBS, SPACE_ACT, settings)
    resumed.load_state_dict(first.state_dict())
    for batch in batches[4:]:
        resumed.update(batch)
    for name in ("actor", "reference"):
        for mine, theirs in zip(resumed.nets[name].parameters(), straight.nets[name].parameters()):
            torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("agent", ["cpl", "cpl_kl"])
def test_cpl_through_orl_train_from_a_label_file(tmp_path, agent):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.logger import read_metrics
    from tests.conftest import random_pendulum_arrays

    data = tmp_path / "pendulum.npz"
    np.savez(data, **random_pendulum_arrays(1200, seed=4))
    from orl.data import make_dataset

    dataset = make_dataset(data)
    scripted_preferences(dataset, queries=100, length=20, seed=0).save(tmp_path / "prefs.npz")
    overrides = [f"agent={agent}", f"dataset={data}", "env=Pendulum-v1", "ref_min_score=-1500", "ref_max_score=0", f"agent.preferences={tmp_path / 'prefs.npz'}",
                 "steps=60", "agent.bc_steps=20", "agent.lr_warmup_steps=0", "agent.hidden=[64,64]", "batch_size=16", "eval.every=60", "eval.episodes=1", "log.every=20", "log.progress=false", "log.tensorboard=false",
                 "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=overrides))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "train/cpl_loss" in r] == [20, 40, 60]
    assert math.isfinite(summary["normalized_mean"])
    # the segment accuracy of the policy's scores rises on the training queries
    assert rows[-2]["train/accuracy"] >= 0.5 or rows[-3]["train/accuracy"] >= 0.5


def test_segment_buffer_gathers_the_labelled_segments():
    data = pendulum_like(500)
    pairs = scripted_preferences(data, queries=30, length=6, seed=2)
    buffer = SegmentPairBuffer(data, pairs)
    batch = buffer.sample(5, torch.Generator().manual_seed(0))
    assert batch.obs.shape == (5, 2, 6, 3) and batch.actions.shape == (5, 2, 6, 1)
    rows = torch.randint(len(buffer), (5,), generator=torch.Generator().manual_seed(0))
    index = pairs.segment_indices()[rows.numpy()]
    np.testing.assert_array_equal(batch.obs.numpy(), data.observations[index])
    np.testing.assert_array_equal(batch.labels.numpy(), pairs.labels[rows.numpy()])


# ---------------------------------------------------------------------------------------------------
# Dense score mode (official biased_bce_with_scores)
def test_rank_loss_is_the_mean_over_every_ordered_pair():
    from orl.agents.cpl import cpl_rank_loss

    score = torch.tensor([0.3, 2.0, -1.0])    # the policy's segment scores S
    target = torch.tensor([5.0, 1.0, 3.0])    # returns: segment 0 > 2 > 1
    loss, accuracy = cpl_rank_loss(score, target, 0.5)
    preferred_over = [(0, 2), (0, 1), (2, 1)]  # (better, worse)
    expected = np.mean([softplus(-(score[b].item() - 0.5 * score[w].item())) for b, w in preferred_over])
    assert loss.item() == pytest.approx(expected)
    assert accuracy.item() == pytest.approx(1 / 3)  # only S_2 > S_1 agrees with the returns (0.3 < 2.0, -1.0 < 2.0)
    # two segments: the pairwise loss with the better one preferred
    pair = torch.tensor([0.3, 2.0])
    assert cpl_rank_loss(pair, torch.tensor([1.0, 0.0]), 0.5)[0].item() == pytest.approx(
        cpl_loss(pair[:1], pair[1:], torch.tensor([1.0]), 0.5).item())


def test_rank_loss_gradient_scales_only_the_worse_score_by_lambda():
    from orl.agents.cpl import cpl_rank_loss

    score = torch.tensor([1.0, 0.5], requires_grad=True)
    cpl_rank_loss(score, torch.tensor([2.0, 1.0]), 0.3)[0].backward()  # segment 0 is better
    slope = torch.sigmoid(torch.tensor(-(1.0 - 0.3 * 0.5))).item()
    assert score.grad.tolist() == pytest.approx([-slope, 0.3 * slope])


def test_scored_segments_file_and_buffer(tmp_path):
    from orl.errors import DataError
    from orl.prefs.buffers import SegmentScoreBuffer
    from orl.prefs.labels import SegmentScores, load_segment_labels, scripted_scores

    data = pendulum_like(500)
    scored = scripted_scores(data, segments=40, length=6, seed=1)
    assert len(set(scored.starts.tolist())) == 40
    returns = data.rewards[scored.segment_indices()].sum(1)
    np.testing.assert_allclose(scored.scores, returns, rtol=1e-5)
    scored.save(tmp_path / "scores.npz")
    loaded = load_segment_labels(tmp_path / "scores.npz", data)
    assert isinstance(loaded, SegmentScores) and np.array_equal(loaded.starts, scored.starts)
    with pytest.raises(DataError, match="only agent=cpl/cpl_kl trains on scored segments"):
        PreferencePairs.load(tmp_path / "scores.npz", data)  # the reward model needs pairs
    # score mode: distinct segments with their scores
    batch = SegmentScoreBuffer(data, loaded, mode="score").sample(40, torch.Generator().manual_seed(0))
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(0)).numpy()
    assert batch.obs.shape == (40, 6, 3) and sorted(rows.tolist()) == list(range(40))
    np.testing.assert_array_equal(batch.actions.numpy(), data.actions[scored.segment_indices()[rows]])
    np.testing.assert_array_equal(batch.scores.numpy(), scored.scores[rows])
    # rank mode: each segment against a random one, labelled by which has the higher return
    pairs = SegmentScoreBuffer(data, loaded).sample(500, torch.Generator().manual_seed(3))
    assert isinstance(pairs, SegmentPairBatch) and pairs.obs.shape == (500, 2, 6, 3)
    index = {tuple(np.round(data.observations[i], 6)): k for k, i in enumerate(scored.starts)}  # segment by its first state
    first = np.array([index[tuple(np.round(o, 6))] for o in pairs.obs[:, 0, 0].numpy()])
    second = np.array([index[tuple(np.round(o, 6))] for o in pairs.obs[:, 1, 0].numpy()])
    expected = np.where(returns[first] > returns[second], 1.0, np.where(first == second, 0.5, 0.0))
    np.testing.assert_array_equal(pairs.labels.numpy(), expected)
    assert 0.3 < pairs.labels.mean() < 0.7


@pytest.mark.parametrize("score_mode", ["rank", "score"])
def test_cpl_learns_from_scored_segments_through_orl_prefs_and_orl_train(tmp_path, capsys, score_mode):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.data import make_dataset
    from orl.logger import read_metrics
    from orl.apps.prefs import prefs_main
    from tests.conftest import random_pendulum_arrays

    data = tmp_path / "pendulum.npz"
    np.savez(data, **random_pendulum_arrays(1200, seed=4), env_id="Pendulum-v1", ref_min_score=-1500.0, ref_max_score=0.0)
    prefs_main(["label", str(data), "--scores", "--queries", "200", "--length", "20", "--out", str(tmp_path / "scores.npz")])
    with pytest.raises(SystemExit):  # pair-teacher noise has no meaning for scores: one message
        prefs_main(["label", str(data), "--scores", "--mistake", "0.1", "--out", str(tmp_path / "x.npz")])
    assert "--mistake label pairs" in capsys.readouterr().err
    overrides = ["agent=cpl", f"dataset={data}", f"agent.preferences={tmp_path / 'scores.npz'}", f"agent.score_mode={score_mode}", "steps=80", "agent.bc_steps=20",
                 "agent.lr_warmup_steps=0", "agent.hidden=[64,64]", "agent.lr=1e-3", "batch_size=32", "eval.every=80", "eval.episodes=1",
                 "log.every=20", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=overrides))
    rows = [r for r in read_metrics(tmp_path / "run") if "train/cpl_loss" in r]
    assert [r["step"] for r in rows] == [20, 40, 60, 80]
    assert rows[-1]["train/cpl_loss"] < rows[1]["train/cpl_loss"]  # the ranking loss falls once CPL starts (step 20)
    assert rows[-1]["train/accuracy"] > 0.5
    assert len(make_dataset(data)) == 1200
