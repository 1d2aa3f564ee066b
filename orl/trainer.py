"""One Trainer for every agent: an offline phase of gradient steps on a dataset, then an optional
online phase of environment steps with a device-resident replay buffer.

Steps are counted globally: offline gradient steps [0, offline_steps), then online environment steps
[offline_steps, offline_steps + online_steps), the bookkeeping WSRL's schedule is written in.

Exact resume: a checkpoint holds the agent (networks, optimizers, schedulers), every RNG (python,
numpy, torch, the batch sampler's generator, the environment's and its action space's), the replay
buffer and the step. Online checkpoints are taken at episode boundaries, where the environment's whole
state is its RNG, so a resumed run repeats an uninterrupted one exactly on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from orl.agent import Agent
from orl.buffer import Batch, TransitionBuffer
from orl.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from orl.data import RewardTransform
from orl.distributed import is_main_process
from orl.errors import ConfigError, DivergenceError
from orl.evaluation import EvalResult, evaluate
from orl.logger import Logger, to_float

OFFLINE_CHECKPOINT = "offline.pt"  # the agent at the end of the offline phase



BUFFER_MODES = ("none", "seed", "mix")


@dataclass
class TrainerConfig:
    offline_steps: int = 100_000
    online_steps: int = 0
    batch_size: int = 256
    seed: int = 0
    eval_every: int = 5000
    eval_episodes: int = 10
    eval_seed_offset: int = 100  # evaluation episode i uses env seed seed + offset + i (A2PR: seed + 100)
    log_every: int = 1000
    checkpoint_every: int = 10_000
    progress: bool = True
    tensorboard: bool = True
    # Online phase.
    buffer_mode: str = "none"  # none: online data only (WSRL) | seed: offline data preloaded (IQL, FamO2O) | mix: fixed ratio (Cal-QL)
    offline_ratio: float = 0.5  # fraction of each batch drawn from offline data in `mix` mode
    online_capacity: int = 1_000_000
    random_steps: int = 0  # uniform-random actions at the start (SAC from scratch)
    warmup_steps: int = 0  # actions from the current (pre-trained) policy, no updates (WSRL)
    learning_starts: int = 0  # no updates before this many online steps
    utd: int = 1  # agent.update calls per environment step
    update_schedule: str = "step"  # step: utd updates after every env step | episode: len(episode) x utd after each episode (Cal-QL)
    online_batch_size: int | None = None  # e.g. WSRL's 1024 (split into critic minibatches by the agent)
    switch_log_window: int = 5000  # log 10x more often for this many online steps from the first update (Q around the switch)
    eval_at_start: bool = False  # evaluate before the first step of a fresh run (online LM runs: the starting policy's score)


class Trainer:
    def __init__(
        self,
        agent: Agent,
        run_dir: str | Path,
        cfg: TrainerConfig,
        offline: TransitionBuffer | None = None,
        env_fn: Callable[[], gym.Env] | None = None,
        ref_scores: tuple[float, float] | None = None,
        evaluator: Callable[[Agent], EvalResult] | None = None,
        reward_transform: RewardTransform | None = None,
    ):
        if cfg.buffer_mode not in BUFFER_MODES:
            raise ConfigError(f"online.buffer_mode must be one of {BUFFER_MODES}, got {cfg.buffer_mode!r}")
        if cfg.update_schedule not in ("step", "episode"):
            raise ConfigError(f"online.update_schedule must be step or episode, got {cfg.update_schedule!r}")
        if cfg.offline_steps > 0 and offline is None:
            raise ConfigError("offline_steps > 0 needs an offline dataset")
        if cfg.online_steps > 0 and env_fn is None:
            raise ConfigError("online_steps > 0 needs an environment")
        if cfg.buffer_mode in ("seed", "mix") and cfg.online_steps > 0 and offline is None:
            raise ConfigError(f"online.buffer_mode={cfg.buffer_mode} needs an offline dataset")
        self.agent, self.cfg, self.offline, self.env_fn, self.ref_scores = agent, cfg, offline, env_fn, ref_scores
        self.evaluator = evaluator  # replaces the control-task evaluation (e.g. text generation through the LM env)
        # The transform the offline data went through; online rewards get the same one before they are
        # stored, so seed/mix batches and online MC returns are on the offline data's scale.
        self.reward_transform = reward_transform or RewardTransform()
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.device = agent.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed)
        self.step = 0
        self.online: TransitionBuffer | None = None
        self.env: gym.Env | None = None
        self.last_eval: EvalResult | None = None
        self.episode_returns: list[float] = []
        self._last_checkpoint_step = 0
        self._saved_final = False
        # Step of the first update whose scalar metrics were not all finite (-1: none), kept on the
        # device so watching every step costs no host sync; read at log and checkpoint steps.
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.logger: Logger | None = None
        # Called as fn(trainer, result) after every evaluation (the collection pipeline saves
        # behaviour-policy snapshots this way).
        self.eval_callbacks: list[Callable[["Trainer", EvalResult], None]] = []
        # Called as fn(trainer) once training is about to start (after a successful resume): the CLI
        # writes the run's config.yaml there, so a resume that fails leaves the old one.
        self.start_callbacks: list[Callable[["Trainer"], None]] = []
        # Under a distributed launcher (accelerate launch, torchrun) every process trains; process 0 alone
        # evaluates and writes metrics, checkpoints and the run's files.
        self.is_main = is_main_process()

    @property
    def total_steps(self) -> int:
        return self.cfg.offline_steps + self.cfg.online_steps

    # ------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> EvalResult | None:
        # Left by a writer killed mid-write (orl.io.atomic_path). Only process 0 writes a run's files, so only it
        # cleans: another rank must not remove a file process 0 is writing.
        for stale in self.run_dir.glob(".*.tmp-*") if self.is_main else ():
            stale.unlink(missing_ok=True)
        resume_step = self._resume() if resume else None
        if resume_step is not None and resume_step >= self.total_steps:
            print(f"[orl] {self.run_dir} already finished at step {resume_step}; nothing to resume")
            return None
        if resume_step is not None:
            print(f"[orl] resuming {self.run_dir} from step {resume_step}")
        for callback in self.start_callbacks if self.is_main else ():
            callback(self)
        self.logger = Logger(self.run_dir, self.cfg.tensorboard, resume_step, enabled=self.is_main)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.cfg.progress, dynamic_ncols=True, unit="step")
        self._bar = bar
        try:
            if resume_step is None and self.step == 0 and self.cfg.eval_at_start and self.cfg.eval_every > 0:
                self.run_evaluation()  # the starting policy: where an online run's curve (and any dip) starts
            if resume_step is None and 0 < self.step == self.cfg.offline_steps and self.cfg.online_steps > 0 and self.cfg.eval_every > 0:
                self.run_evaluation()  # started from a pre-trained agent (init_from): the online curve starts at the switch
            while self.step < self.cfg.offline_steps:
                self._offline_step()
            if self.cfg.online_steps > 0:
                self._online_phase()
        finally:
            bar.close()
            self.logger.close()
        return self.last_eval

    # --- offline ---------------------------------------------------------------------------
    def _offline_step(self) -> None:
        metrics = self.agent.update(self.offline.sample(self.cfg.batch_size, self.generator))
        self.step += 1
        self._watch(metrics)
        self._bar.update(1)
        self._periodic(metrics, prefix="train/")
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.offline_steps:
            self.save()
        if self.step == self.cfg.offline_steps and self.cfg.online_steps > 0:
            # Kept beside checkpoint.pt (which the online phase overwrites) so one pre-training can seed
            # several fine-tuning runs: orl-finetune init_from=<this run dir>.
            self.check_finite()
            if self.is_main:
                save_checkpoint({"agent": self.agent.state_dict(), "step": self.step, "reward_transform": self.reward_transform.state_dict()},
                                self.run_dir / OFFLINE_CHECKPOINT)

    def _watch(self, metrics: dict[str, Any]) -> None:
        scalars = [v for v in metrics.values() if isinstance(v, torch.Tensor) and v.dim() == 0]
        if scalars:
            finite = torch.isfinite(torch.stack([v.detach().float().to(self.device) for v in scalars])).all()
            self._first_bad_step = torch.where((self._first_bad_step < 0) & ~finite, torch.full_like(self._first_bad_step, self.step),
                                               self._first_bad_step)
        self._last_metrics = metrics

    def check_finite(self) -> None:
        """Raise DivergenceError if a loss went non-finite since the start, or a weight is non-finite now."""
        bad_step = int(self._first_bad_step)
        if bad_step >= 0:
            names = [k for k, v in getattr(self, "_last_metrics", {}).items()
                     if isinstance(v, torch.Tensor) and v.dim() == 0 and not bool(torch.isfinite(v))]
            raise DivergenceError(self._divergence_message(f"the losses became non-finite at step {bad_step}"
                                                           + (f" ({', '.join(names)} at step {self.step})" if names else "")))
        for name, param in self.agent.nets.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise DivergenceError(self._divergence_message(f"parameter {name} is non-finite at step {self.step}"))

    def _divergence_message(self, what: str) -> str:
        kept = f"the last good checkpoint (step {self._last_checkpoint_step}) is kept at {self.checkpoint_path}" if self.checkpoint_path.exists() \
            else "no checkpoint had been written yet"
        return (f"training diverged: {what}; {kept}. Lower the learning rates, check the data's reward scale "
                "(data.reward), or try precision=fp32.")

    def _periodic(self, metrics: dict[str, Any], prefix: str) -> None:
        if self.step % self.cfg.log_every == 0:
            self.check_finite()
            self.logger.log(self.step, metrics, prefix)
        if self.cfg.eval_every > 0 and (self.step % self.cfg.eval_every == 0 or self.step == self.total_steps):
            self.run_evaluation()

    def run_evaluation(self) -> EvalResult | None:
        if not self.is_main:
            return None
        if self.evaluator is not None:
            result = self.evaluator(self.agent)
        elif self.env_fn is None or self.cfg.eval_episodes <= 0:
            return None
        else:
            result = evaluate(self.agent, self.env_fn, self.cfg.eval_episodes, self.cfg.seed + self.cfg.eval_seed_offset, ref_scores=self.ref_scores)
        self.last_eval = result
        self.logger.log(self.step, result.metrics())
        score = result.mean_normalized if result.mean_normalized is not None else result.mean_return
        self._bar.set_postfix_str(f"eval {'score' if result.normalized is not None else 'return'} {score:.1f}")
        for callback in self.eval_callbacks:
            callback(self, result)
        return result

    # --- online ----------------------------------------------------------------------------
    def _setup_online(self) -> None:
        cfg = self.cfg
        if self.online is None:
            self._setup_online_buffer_only()
            if cfg.buffer_mode == "seed":
                # Preload the whole offline dataset; online transitions are appended after it.
                storage = self.offline.storage
                self.online.add_batch(**{k: storage[k][: len(self.offline)] for k in self.online.storage if k in storage})
        self.env = self.env_fn()
        self._episode_return, self._episode_length = 0.0, 0
        self._episode_start = self._completed = self.online.size

    def _online_phase(self) -> None:
        cfg = self.cfg
        first_entry = self.online is None
        self._setup_online()
        if first_entry:
            self.agent.on_online_start(trainer=self)
            self._obs, _ = self.env.reset(seed=cfg.seed)
            self.env.action_space.seed(cfg.seed)
        else:
            self._obs = self._restore_env()
        mean, std = self.agent.obs_mean.cpu().numpy(), self.agent.obs_std.cpu().numpy()
        metrics: dict[str, Any] = {}
        while self.step < self.total_steps:
            online_step = self.step - cfg.offline_steps
            if online_step < cfg.random_steps:
                action = self.env.action_space.sample()
            else:
                action = self.agent.act(self._obs, deterministic=False)
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            self.online.add_batch(
                obs=((self._obs - mean) / std)[None],
                actions=np.asarray(action, np.float32)[None],
                rewards=np.asarray([self.reward_transform(float(reward))], np.float32),
                next_obs=((next_obs - mean) / std)[None],
                terminals=np.asarray([float(terminated)], np.float32),
                timeouts=np.asarray([float(truncated and not terminated)], np.float32),
            )
            self._episode_return += float(reward)  # raw env reward: returns and scores are on the env's scale
            self._episode_length += 1
            self._obs = next_obs
            self.step += 1
            self._bar.update(1)
            online_step += 1
            quiet_steps = max(cfg.learning_starts, cfg.warmup_steps)
            updating = online_step > quiet_steps and (not self.needs_returns or self._completed > 0)
            if updating and cfg.update_schedule == "step":
                for _ in range(cfg.utd):
                    metrics = self.agent.update(self._online_batch())
                    self._watch(metrics)
            episode_end = terminated or truncated
            episode_steps = self._episode_length
            if episode_end:
                self._end_episode()
            if cfg.update_schedule == "episode" and (episode_end or self.step == self.total_steps):
                # Official Cal-QL (conservative_sac_main.py): roll out a whole trajectory with the policy fixed, then
                # len(trajectory) x utd updates; steps inside the warm-up / learning_starts window don't count. The run's
                # unfinished last episode gets its updates before the final evaluation (the official loop finishes the
                # trajectory it is in and trains on it).
                burst = min(episode_steps, max(online_step - quiet_steps, 0)) * cfg.utd
                if burst and (not self.needs_returns or self._completed > 0):
                    for _ in range(burst):
                        metrics = self.agent.update(self._online_batch())
                        self._watch(metrics)
                    self.logger.log(self.step, {**metrics, "updates": burst}, "train/")  # once per burst
                metrics = {}  # not repeated in the periodic rows below, which a resumed run could not repeat
            # 10x denser logging for the first switch_log_window steps of updates (after any warm-up)
            log_every = max(cfg.log_every // 10, 1) if online_step <= quiet_steps + cfg.switch_log_window else cfg.log_every
            if self.step % log_every == 0:
                self.check_finite()
                warmup_left = max(cfg.warmup_steps - online_step, 0)
                self.logger.log(self.step, {**metrics, "online_step": online_step, "buffer_size": len(self.online),
                                            "updating": float(updating), "warmup_remaining": warmup_left}, "train/")
            if cfg.eval_every > 0 and (online_step % cfg.eval_every == 0 or self.step == self.total_steps):
                self.run_evaluation()
            if episode_end:
                # Checkpoint only at episode boundaries, where the env's state is just its RNG.
                due = self.step - self._last_checkpoint_step >= cfg.checkpoint_every
                if due or self.step == self.total_steps:
                    self.save()
                self._obs = self._reset_env()
        if not self._saved_final:
            self.save()

    def _online_batch(self) -> Batch:
        cfg = self.cfg
        batch_size = cfg.online_batch_size or cfg.batch_size
        # Agents that keep Monte-Carlo returns only see transitions of finished episodes (their returns are known).
        limit = self._completed if self.needs_returns else None
        if cfg.buffer_mode != "mix":
            return self.online.sample(batch_size, self.generator, limit)
        n_offline = int(round(cfg.offline_ratio * batch_size))
        parts = [self.offline.sample(n_offline, self.generator), self.online.sample(batch_size - n_offline, self.generator, limit)]
        return Batch.cat(parts)

    def _end_episode(self) -> None:
        self.episode_returns.append(self._episode_return)
        row = {"episode_return": self._episode_return, "episode_length": self._episode_length}
        if self.ref_scores is not None:
            low, high = self.ref_scores
            row["episode_normalized"] = 100.0 * (self._episode_return - low) / (high - low)
            # Cumulative regret (Cal-QL's definition): mean over online episodes of 1 - normalized/100.
            normalized = 100.0 * (np.asarray(self.episode_returns) - low) / (high - low)
            row["cumulative_regret"] = float(np.mean(1.0 - normalized / 100.0))
        self.logger.log(self.step, row, "online/")
        # Before the episode's rows become sampleable: an agent with needs_returns_to_go writes their returns here.
        self.agent.on_episode_end(trainer=self, episode_return=self._episode_return, episode_length=self._episode_length,
                                  buffer=self.online, start=self._episode_start, end=self.online.size)
        self._episode_start = self._completed = self.online.size
        self._episode_return, self._episode_length = 0.0, 0

    def _reset_env(self) -> np.ndarray:
        obs, _ = self.env.reset()
        return obs

    def _restore_env(self) -> np.ndarray:
        # Resume happens right after an episode ended: restore the RNGs that the next reset consumes.
        self.env.reset(seed=self.cfg.seed)
        self.env.unwrapped.np_random.bit_generator.state = self._env_rng["env"]
        self.env.action_space.np_random.bit_generator.state = self._env_rng["action_space"]
        return self._reset_env()

    # --- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        self.check_finite()  # a diverged agent never becomes the latest checkpoint
        state = {
            "agent": self.agent.state_dict(),
            "step": self.step,
            "rng": rng_state(),
            "sampler": self.generator.get_state(),
            "episode_returns": self.episode_returns,
            "reward_transform": self.reward_transform.state_dict(),
            "time": time.time(),
        }
        if not self.is_main:
            return
        if self.online is not None:
            state["online_buffer"] = self.online.state_dict()
            state["env_rng"] = {
                "env": self.env.unwrapped.np_random.bit_generator.state,
                "action_space": self.env.action_space.np_random.bit_generator.state,
            }
        save_checkpoint(state, self.checkpoint_path)
        self._last_checkpoint_step = self.step
        self._saved_final = self.step == self.total_steps

    def _resume(self) -> int | None:
        if not self.checkpoint_path.exists():
            return None
        state = load_checkpoint(self.checkpoint_path, map_location="cpu")
        bad = [k for k, v in state["agent"]["nets"].items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise DivergenceError(f"{self.checkpoint_path} holds non-finite weights ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                                  "it cannot be resumed. Start a new run (or init_from an earlier offline.pt).")
        self.agent.load_state_dict(state["agent"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["sampler"])
        self.episode_returns = list(state.get("episode_returns", []))
        if "reward_transform" in state:
            saved = RewardTransform.from_state(state["reward_transform"])
            if not saved.same_as(self.reward_transform):
                raise ConfigError(
                    f"{self.checkpoint_path} was trained with reward transform {saved.state_dict()} but this run is set up "
                    f"with {self.reward_transform.state_dict()}; resume with the run's own data.reward settings (its config.yaml)"
                )
        if "online_buffer" in state:
            self._setup_online_buffer_only()
            self.online.load_state_dict(state["online_buffer"])
            self._env_rng = state["env_rng"]
            self._completed = self._episode_start = self.online.size  # checkpoints sit at episode boundaries
        self._last_checkpoint_step = self.step
        return self.step

    def _setup_online_buffer_only(self) -> None:
        capacity = self.cfg.online_capacity + (len(self.offline) if self.cfg.buffer_mode == "seed" else 0)
        if self.needs_returns and self.cfg.online_capacity < self.cfg.online_steps:
            raise ConfigError(f"agent {self.agent.name} keeps Monte-Carlo returns of online episodes: online.online_capacity "
                              f"({self.cfg.online_capacity}) must be >= online.steps ({self.cfg.online_steps}) (no buffer wrap-around)")
        self.online = TransitionBuffer(capacity, self.agent.obs_dim, self.agent.action_dim, self.device, with_returns=self.needs_returns)
        self._episode_start = self.online.size
        self._completed = self.online.size

    @property
    def needs_returns(self) -> bool:
        return self.agent.needs_returns_to_go


__all__ = ["DivergenceError", "Trainer", "TrainerConfig", "to_float"]
