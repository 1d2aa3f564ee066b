"""`orl-train` on text data: the wiring of a language-model run, beside the LM agents it serves.

The CLI only dispatches here (dataset = a `.jsonl` file or a Hugging Face datasets directory). What differs
between LM agents is declared by the agents themselves (orl/text/agent.py::LMAgent):
  * `data_kind`: which rows they train on: "rewarded" {prompt, response, reward} (A-LoL), "pairs"
    {prompt, chosen, rejected} (DPO, reward models) or "prompts" {prompt, other columns} (GRPO, RLOO: they
    generate online, and every other column goes to the reward functions);
  * `prepare_run(run)`: work before the first step (A-LoL fits V_ref on the reference's generations,
    DPO caches reference log-probs);
  * `evaluate_run(run)`: what an evaluation reports (generation by default; pair accuracy for a reward
    model); `exports_policy`: whether run_dir/hf receives the trained policy.
A new LM agent is one file plus one yaml, as for control.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from orl.distributed import world_size
from orl.errors import ConfigError, DataError, DataFileNotFound
from orl.provenance import file_checksum, write_provenance


@dataclass
class TextRun:
    """What an LM agent may need before and while it trains."""

    rows: list[dict]               # the validated (and chat-rendered) training rows
    tokenizer: Any
    buffer: Any                    # SequenceBuffer | PairBuffer | PromptBuffer, by the agent's data_kind
    eval_prompts: list[str]        # held-out prompts that fit the context with max_new_tokens
    reward_fn: Callable[[str, str], float]
    max_new_tokens: int
    limits: dict[str, int | None]  # max_length / max_prompt_length of training rows
    num_value_prompts: int
    seed: int
    device: torch.device
    eval_rows: list[dict] = field(default_factory=list)  # the held-out rows (lm.holdout), never trained on
    eval_seeds: list[int] = field(default_factory=list)  # multi-turn environments: held-out episode seeds
    value_seeds: list[int] = field(default_factory=list)  # and others held out for fitting values (A-LoL's V_ref)
    value_prompts: list[str] = field(default_factory=list)  # lm.value_prompts: held-out prompts for values (default: eval_prompts)


def run_text(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Train one LM agent on a text dataset as `cfg` describes; returns the final evaluation summary."""
    from orl.text.encoding import CHAT_ROW, pair_buffer, render_chat, text_buffer
    from orl.text.generation import VectorTokenEnv
    from orl.text.runtime import context_length, load_tokenizer
    from orl.envs.reasoning_gym import is_task
    from orl.envs.reasoning_gym import load_rows as load_task_rows
    from orl.envs.text_rewards import make_text_reward
    from orl.text.rewards import per_sample_reward
    from orl.agent import agent_class, make_agent
    from orl.text.data import JSONL_FIELDS, PromptBuffer, load_text_rows

    lm = cfg.lm
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    agent_name = agent_cfg.pop("name")
    kind = agent_class(agent_name).data_kind
    if kind is None:
        raise ConfigError(f"agent {agent_name!r} trains on control transitions, not text; dataset={cfg.dataset} is a text dataset. "
                          "Use a language-model agent (alol, dpo, reward_model, rloo) or a .npz/.hdf5/Minari dataset")
    from orl.text.conversation import is_conversation_file

    if is_conversation_file(str(cfg.dataset)):
        return run_logged_conversations(cfg, device, agent_name, agent_cfg)
    if lm.get("min_return") is not None and kind != "rewarded":
        raise ConfigError(f"lm.min_return filters rewarded rows or logged conversations by their reward; agent={agent_name} trains on "
                          f"{kind} rows")
    task = is_task(str(cfg.dataset))
    if task and kind != "prompts":
        raise ConfigError(f"dataset={cfg.dataset} is a procedural task with answers, not {kind} rows: train it with agent=grpo or rloo")
    # the data is checked before any model loads
    rows = load_task_rows(str(cfg.dataset), OmegaConf.to_container(lm.task) if lm.get("task") else None) if task else \
        load_text_rows(str(cfg.dataset), kind)
    if lm.get("min_return") is not None:  # filtered behaviour cloning: keep the rows that went well
        total = len(rows)
        rows = [row for row in rows if float(row["reward"]) >= float(lm.min_return)]
        if not rows:
            raise DataError(f"no row of {cfg.dataset} has a reward >= lm.min_return={lm.min_return}")
        print(f"[orl] kept {len(rows)} of {total} rows with reward >= {lm.min_return}")
    # a generated task's checksum: of all its rows, before any is held out (the split depends on the run's seed)
    generated = hashlib.sha256(json.dumps([[r["prompt"], r.get("answer")] for r in rows]).encode()).hexdigest() if task else None
    model_path = _policy_path(cfg)
    agent_cfg["model_path"] = model_path
    # The reward for A-LoL's value targets, RLOO's returns and evaluation: a built-in, a sequence-classification
    # model by path, or an orl reward_model run directory.
    if str(cfg.get("precision", "fp32")) != "fp32":
        raise ConfigError(f"precision={cfg.precision} applies to control agents' MLPs; a language model's precision is lm.dtype "
                          "(lm.dtype=bfloat16 trains in bf16 weights; the default float32 keeps fp32 updates)")
    spec = lm.reward
    if spec is None and task:
        spec = "reasoning_gym"  # the task's own score_answer
    if spec is None and str(model_path) == str(lm.embedded_model) and not cfg.get("init_from"):
        spec = "increasing_numbers"  # the embedded tiny model's own task (make lm-demo); a user's model gets no toy reward
    if spec is None:
        if agent_class(agent_name).needs_reward:
            raise ConfigError(f"agent {agent_name} trains on a reward: give lm.reward=<package.module:function | a reward model "
                              "directory | an orl reward_model run | a built-in such as keyword:<word>>")
        print("[orl] no lm.reward: evaluation reports response length and distinct-n; its rewards are 0")
    specs = [] if spec is None else (list(spec) if OmegaConf.is_list(spec) else [spec])
    reward_funcs = [make_text_reward(str(spec), device) for spec in specs]
    reward_weights = list(lm.reward_weights) if lm.get("reward_weights") is not None else None
    tokenizer = load_tokenizer(model_path)
    rows = render_chat(rows, tokenizer, [f for f in JSONL_FIELDS[kind] if f != "reward"], _template_kwargs(lm))
    dataset_rows = len(rows)
    rows, held_out, held_out_index = _hold_out(cfg, rows)
    # R(prompt, response) for evaluation and A-LoL: a reward function sees a prompt's row as in GRPO (its other columns;
    # on chat rows, the messages), the held-out row first where a prompt is in both
    contexts: dict[str, dict] = {}
    for row in held_out + rows:
        contexts.setdefault(row["prompt"], {k: v for k, v in row.items() if k not in (*JSONL_FIELDS[kind], CHAT_ROW)})
    reward_fn = per_sample_reward(reward_funcs, reward_weights, contexts, tokenizer) if reward_funcs else None
    eval_prompts = _eval_prompts(cfg, held_out or rows)
    probe = VectorTokenEnv(tokenizer, eval_prompts[:1], max_new_tokens=int(lm.max_new_tokens))
    agent = make_agent(agent_name, probe.single_observation_space, probe.single_action_space, agent_cfg, device)
    if hasattr(agent, "set_rewards"):  # the GRPO family: every reward function in TRL's signature, with its weights
        agent.set_rewards(reward_funcs, reward_weights)
        agent.max_steps = int(cfg.steps)  # trainer_state.max_steps of the reward functions
    else:
        agent.reward_fn = reward_fn

    # Rows longer than the context are truncated (TRL's max_length / max_prompt_length), with a warning.
    # Defaults: the model's context, and prompts that leave room for max_new_tokens (as generation needs).
    context = context_length(agent.nets["policy"], tokenizer)
    max_length = int(lm.max_length) if lm.get("max_length") else context
    default_prompt = max_length - int(lm.max_new_tokens) if max_length and max_length > int(lm.max_new_tokens) else None
    limits = dict(max_length=max_length, max_prompt_length=int(lm.max_prompt_length) if lm.get("max_prompt_length") else default_prompt)
    # Generation needs prompt + new tokens (lm.max_new_tokens, or the agent's own completion length for the GRPO
    # family) within the context: longer evaluation prompts, and longer training prompts of agents that generate
    # from them, are skipped up front with a warning instead of failing mid-run.
    new_tokens = int(agent_cfg.get("max_completion_length", lm.max_new_tokens))
    if context:
        eval_prompts = _fitting(eval_prompts, lambda p: p, tokenizer, context, new_tokens, "evaluation prompts",
                                "give shorter prompts with lm.eval_prompts=<file> or generate fewer tokens")
        if kind == "prompts":
            rows = _fitting(rows, lambda row: row["prompt"], tokenizer, context, new_tokens, "training prompts",
                            f"give {cfg.dataset} shorter prompts or lower agent.max_completion_length")
    add_eos = [not row.get(CHAT_ROW, False) for row in rows]  # TRL: EOS after plain-text completions only
    if kind == "prompts":  # every other column of the rows goes to the reward functions (TRL's convention)
        extra = sorted({key for row in rows for key in row if key not in ("prompt", CHAT_ROW)})
        buffer = PromptBuffer([r["prompt"] for r in rows], device, {key: [r.get(key) for r in rows] for key in extra})
    elif kind == "rewarded":
        buffer = text_buffer(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], [r["reward"] for r in rows], device,
                             add_eos=add_eos, **limits)
    else:
        buffer = pair_buffer(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows], device,
                             add_eos=add_eos, **limits)
    value_prompts = _prompt_file(lm.value_prompts, "lm.value_prompts") if lm.get("value_prompts") else []
    run = TextRun(rows, tokenizer, buffer, eval_prompts, reward_fn, int(lm.max_new_tokens), limits, int(lm.num_value_prompts),
                  int(cfg.seed), device, eval_rows=held_out, value_prompts=value_prompts)
    prepared = agent.prepare_run(run)
    if prepared:
        print(f"[orl] {agent_name} data: {prepared}")
    local = Path(str(cfg.dataset))
    data_record = {"id": str(cfg.dataset), "sha256": file_checksum(local) if local.exists() else generated, "rows": dataset_rows, "train_rows": len(rows), "model": str(model_path),
                   "task_options": OmegaConf.to_container(lm.task) if task and lm.get("task") else None,
                   "held_out_rows": held_out_index}  # 0-based indices of the dataset's rows left out of training
    return _train(cfg, agent, agent_name, run, data_record, f"{cfg.dataset} ({len(rows)} rows, model {model_path}, device {device})")


def _train(cfg: DictConfig, agent, agent_name: str, run: TextRun, data_record: dict, what: str) -> dict[str, Any]:
    """The part every LM run shares: the run directory, the Trainer, provenance, the exported policy, the summary."""
    from orl.apps.runs import resolve_run_dir, trainer_config, write_run_config
    from orl.text.runtime import save_hf
    from orl.trainer import Trainer

    device, tokenizer = run.device, run.tokenizer
    parallel = agent.data_parallel  # under `accelerate launch`: process 0 picks the run directory, the others learn it
    run_dir = resolve_run_dir(cfg, agent_name) if parallel.rank == 0 else None
    if parallel.world > 1:
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir) if run_dir is not None else ""])[0])
    if parallel.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    if parallel.world > 1:
        print(f"[orl] data parallel: process {parallel.rank} of {parallel.world}, batch_size={cfg.batch_size} in all")
    print(f"[orl] {agent_name} on {what} -> {run_dir}")
    settings = trainer_config(cfg, int(cfg.steps))
    # agents that learn from their own samples start their curve with the starting policy's score (after init_from:
    # the offline policy's, so the dip after the switch to online is in the metrics, as on the control side)
    settings.eval_at_start = agent.data_kind == "prompts"
    trainer = Trainer(agent, run_dir, settings, run.buffer, evaluator=lambda agent_: agent_.evaluate_run(run))
    trainer.start_callbacks.append(lambda trainer_: write_provenance(run_dir, data_record, str(device), trainer_.step))
    trainer.start_callbacks.append(lambda _: write_run_config(run_dir, cfg))
    result = trainer.train(resume=bool(cfg.resume))
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if agent.exports_policy and parallel.rank == 0:
        # The trained policy in Hugging Face format: AutoModelForCausalLM.from_pretrained(run_dir / "hf").
        save_hf(agent.export_policy(), tokenizer, run_dir / "hf")
        summary["hf_model"] = str(run_dir / "hf")
        if hasattr(agent, "export_extra"):  # what the agent's decoding needs beyond the LM (ILQL's heads)
            from orl.io import atomic_path

            with atomic_path(run_dir / "hf" / "orl_extra.pt") as tmp:
                torch.save(agent.export_extra(), tmp)
        print(f"[orl] policy saved in Hugging Face format: {run_dir / 'hf'}")
    if result is not None:
        summary.update(result.metrics(prefix=""))
        print(f"[orl] final evaluation on {len(result.returns)} episodes: mean return {result.mean_return:.3f}, length {result.lengths.mean():.1f}"
              + "".join(f", {k} {v:.3f}" for k, v in result.extra.items() if k in ("success", "turns")))
    print(f"[orl] metrics: {run_dir / 'metrics.jsonl'}   tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    return summary


def run_logged_conversations(cfg: DictConfig, device: torch.device, agent_name: str, agent_cfg: dict) -> dict[str, Any]:
    """Offline training on logged conversations (orl-collect env=text:<task>): sequence agents (A-LoL; filtered
    behaviour cloning is `agent.variant=nll lm.min_return=<r>`) train on the agent's tokens of whole conversations,
    weighted by the episode's return, and are evaluated by playing the conversations' environment on held-out seeds."""
    from orl.agent import agent_class
    from orl.envs.text_games import eval_seeds, make_text_env
    from orl.text.conversation import ConversationFormat, SeedBuffer, conversation_buffer, load_conversations
    from orl.text.runtime import context_length, eos_token_ids

    lm = cfg.lm
    if agent_class(agent_name).data_kind != "rewarded":
        raise ConfigError(f"{cfg.dataset} holds logged conversations: train them with agent=alol (agent.variant=nll and lm.min_return "
                          f"for filtered behaviour cloning) or agent=ilql; agent={agent_name} trains on {agent_class(agent_name).data_kind}")
    rows = load_conversations(cfg.dataset)
    overlapping = sum(int(row.get("seed") or 0) >= SeedBuffer.HIGH for row in rows)
    if overlapping:
        warnings.warn(f"{overlapping} of {len(rows)} conversations of {cfg.dataset} have seeds >= {SeedBuffer.HIGH}, where orl's evaluation "
                      "seeds lie: their episodes may be evaluated on (log with orl-collect, which draws training seeds below it)", stacklevel=2)
    env_ids = sorted({str(row.get("env")) for row in rows if row.get("env")})
    env_id = str(cfg.env) if cfg.env else (env_ids[0] if len(env_ids) == 1 else None)
    if env_id is None:
        raise ConfigError(f"{cfg.dataset}: the conversations name {len(env_ids)} environments ({', '.join(env_ids) or 'none'}); "
                          "evaluation plays one: give env=<text:task | textarena:game>")
    options = _env_options(lm)
    make_text_env(env_id, **options)
    total = len(rows)
    if lm.get("min_return") is not None:  # filtered behaviour cloning: keep the conversations that went well
        rows = [row for row in rows if float(row["return"]) >= float(lm.min_return)]
        if not rows:
            raise DataError(f"no conversation of {cfg.dataset} has a return >= lm.min_return={lm.min_return}")
        print(f"[orl] kept {len(rows)} of {total} conversations with return >= {lm.min_return}")
    agent, tokenizer, model_path = _conversation_agent(cfg, agent_name, agent_cfg, device)
    policy = agent.nets["policy"]
    chat = _chat_option(lm.get("chat", "auto"))
    stop = str(lm.get("stop", "\n"))
    fmt = ConversationFormat(tokenizer, eos_token_ids(tokenizer, policy), chat, stop, _template_kwargs(lm))
    buffer = conversation_buffer(fmt, rows, device, context_length(policy, tokenizer))
    agent.set_conversation_env(lambda: make_text_env(env_id, **options), env_id=env_id, chat=chat, stop=stop,
                               max_turn_tokens=int(lm.max_new_tokens), chat_template_kwargs=_template_kwargs(lm))
    # evaluation seeds, then value-fitting seeds: both above every training seed, and disjoint from each other
    seeds = eval_seeds(int(lm.num_eval_episodes) + int(lm.num_value_prompts))
    run = TextRun(rows, tokenizer, buffer, [], None, int(lm.max_new_tokens), {}, int(lm.num_value_prompts), int(cfg.seed), device,
                  eval_seeds=seeds[: int(lm.num_eval_episodes)], value_seeds=seeds[int(lm.num_eval_episodes):])
    prepared = agent.prepare_run(run)
    if prepared:
        print(f"[orl] {agent_name} data: {prepared}")
    data_record = {"id": str(cfg.dataset), "sha256": file_checksum(Path(str(cfg.dataset))), "rows": total, "train_rows": len(rows),
                   "env": env_id, "env_options": options, "model": str(model_path), "min_return": lm.get("min_return"),
                   "eval_seeds": f"{seeds[0]}..{seeds[int(lm.num_eval_episodes) - 1]}"}
    return _train(cfg, agent, agent_name, run, data_record, f"{cfg.dataset} ({len(rows)} conversations, env {env_id}, model {model_path})")


def log_conversations(cfg: DictConfig) -> Path:
    """orl-collect env=text:<task>: play `conversations.episodes` conversations with a language model from training seeds
    and write them as JSON lines (orl/text/conversation.py::save_conversations), the offline data of agent=alol."""
    from orl.envs.text_games import make_text_env, train_seeds
    from orl.io import atomic_write_json
    from orl.text.conversation import rollout_conversations, save_conversations
    from orl.text.runtime import load_lm

    spec, settings = str(cfg.env), cfg.conversations
    options = _env_options(settings)
    make_text_env(spec, **options)
    path = str(settings.model)
    if path == "data/tiny-lm":
        from orl.envs.tiny_lm import build_tiny_lm

        build_tiny_lm(path)  # built on first use; reused while its settings are the current ones
    model, tokenizer = load_lm(path, "cpu")
    episodes, seed = int(settings.episodes), int(cfg.seed)
    out = Path(str(settings.out)) if settings.get("out") else \
        Path("data/conversations") / f"{spec.replace(':', '-').replace('/', '-')}-{episodes}-seed{seed}.jsonl"
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists; give conversations.out=<another file> or overwrite=true")
    seeds = train_seeds(episodes, seed)
    generator = torch.Generator().manual_seed(seed)
    chat = _chat_option(settings.get("chat", "auto"))
    convs = []
    batch = int(settings.batch_size)
    for start in range(0, episodes, batch):
        part = seeds[start : start + batch]
        convs.extend(rollout_conversations(model, tokenizer, [make_text_env(spec, **options) for _ in part], part,
                                           max_turn_tokens=int(settings.max_turn_tokens), temperature=float(settings.temperature),
                                           generator=generator, chat=chat, stop=str(settings.stop), env_id=spec))
        if cfg.progress:
            print(f"[orl-collect] {len(convs)}/{episodes} conversations")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_conversations(out, convs)
    summary = {"env": spec, "env_options": options, "model": path, "episodes": episodes, "seed": seed,
               "temperature": float(settings.temperature), "max_turn_tokens": int(settings.max_turn_tokens),
               "success": float(np.mean([bool(c.success) for c in convs])), "return_mean": float(np.mean([c.episode_return for c in convs])),
               "turns_mean": float(np.mean([c.turns for c in convs])), "sha256": file_checksum(out)}
    atomic_write_json(out.with_suffix(".json"), summary)
    print(f"[orl-collect] {episodes} conversations -> {out}: success {summary['success']:.3f}, return {summary['return_mean']:.3f}, "
          f"turns {summary['turns_mean']:.2f}")
    return out


def run_conversations(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Online RL in a multi-turn text environment (`env=text:<task>` or `env=textarena:<game>`) with the GRPO family:
    a batch is `batch_size` episode seeds x num_generations conversations; evaluation plays held-out seeds."""
    from orl.agent import agent_class
    from orl.envs.text_games import eval_seeds, make_text_env
    from orl.text.conversation import SeedBuffer

    lm = cfg.lm
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    agent_name = agent_cfg.pop("name")
    agent_type = agent_class(agent_name)
    if agent_type.data_kind != "prompts":
        raise ConfigError(f"env={cfg.env} is a multi-turn text environment, trained online by agent=grpo or rloo (got agent={agent_name}); "
                          "to train offline on it, log conversations with `orl-collect env=" + str(cfg.env) + "` and give the file as dataset=")
    options = _env_options(lm)
    make_text_env(str(cfg.env), **options)  # a bad id or option fails here, before any model loads
    agent, tokenizer, model_path = _conversation_agent(cfg, agent_name, agent_cfg, device)
    chat = _chat_option(lm.get("chat", "auto"))
    turn_tokens = int(agent_cfg.get("max_completion_length", lm.max_new_tokens))
    _check_opening_fits(cfg, agent.nets["policy"], tokenizer, options, chat, turn_tokens)
    agent.set_conversation_env(lambda: make_text_env(str(cfg.env), **options), env_id=str(cfg.env), chat=chat, stop=str(lm.get("stop", "\n")),
                               max_turn_tokens=turn_tokens, chat_template_kwargs=_template_kwargs(lm))
    seeds = eval_seeds(int(lm.num_eval_episodes))
    run = TextRun([], tokenizer, SeedBuffer(device), [], None, turn_tokens, {}, 0, int(cfg.seed), device, eval_seeds=seeds)
    data_record = {"id": str(cfg.env), "source": "environment", "sha256": None, "env_options": options, "model": str(model_path),
                   "train_seeds": f"drawn from [0, {SeedBuffer.HIGH})", "eval_seeds": f"{seeds[0]}..{seeds[-1]}"}
    return _train(cfg, agent, agent_name, run, data_record, f"{cfg.env} (model {model_path}, device {device})")


def _env_options(node: DictConfig) -> dict:
    """`env_options` of lm (orl-train) or conversations (orl-collect): keyword arguments of the text environment."""
    return OmegaConf.to_container(node.env_options, resolve=True) if node.get("env_options") else {}


def _conversation_agent(cfg: DictConfig, agent_name: str, agent_cfg: dict, device: torch.device):
    """(agent, tokenizer, model path) of an LM run in a text environment: the model of lm.model or init_from."""
    from orl.agent import make_agent
    from orl.text.generation import VectorTokenEnv
    from orl.text.runtime import load_tokenizer

    model_path = _policy_path(cfg)
    agent_cfg["model_path"] = model_path
    tokenizer = load_tokenizer(model_path)
    probe = VectorTokenEnv(tokenizer, [""], max_new_tokens=1)  # the token spaces the agent is built with
    return make_agent(agent_name, probe.single_observation_space, probe.single_action_space, agent_cfg, device), tokenizer, model_path


def _check_opening_fits(cfg: DictConfig, model, tokenizer, options: dict, chat: bool | None, turn_tokens: int) -> None:
    """A conversation whose opening leaves no room for a turn in the model's context would end before it starts: refuse
    the run up front (measured on the first evaluation episode)."""
    from orl.envs.text_games import eval_seeds, make_text_env
    from orl.text.conversation import ConversationFormat
    from orl.text.runtime import context_length, eos_token_ids

    context = context_length(model, tokenizer)
    env = make_text_env(str(cfg.env), **options)
    opening, _ = env.reset(eval_seeds(1)[0])
    fmt = ConversationFormat(tokenizer, eos_token_ids(tokenizer, model), chat, str(cfg.lm.get("stop", "\n")), _template_kwargs(cfg.lm))
    _, ids = fmt.opening(getattr(env, "system_prompt", None), opening)
    if context is not None and len(ids) + turn_tokens > context:
        raise ConfigError(f"env={cfg.env} opens with {len(ids)} tokens of this model; a turn of up to {turn_tokens} tokens "
                          f"(agent.max_completion_length) after it needs {len(ids) + turn_tokens} positions, but the model's context is "
                          f"{context}: use a model with a longer context (lm.model=<path or hub id>)")


def _template_kwargs(lm: DictConfig) -> dict:
    """lm.chat_template_kwargs: variables of the chat template (TRL's chat_template_kwargs), e.g. {enable_thinking: false}."""
    value = lm.get("chat_template_kwargs")
    if value is None:
        return {}
    if not OmegaConf.is_dict(value):
        raise ConfigError(f"lm.chat_template_kwargs must be a mapping of the template's variables, e.g. "
                          f"'lm.chat_template_kwargs={{enable_thinking: false}}', got {value!r}")
    return OmegaConf.to_container(value, resolve=True)


def _chat_option(value) -> bool | None:
    """lm.chat / conversations.chat: auto (None: a tokenizer with a chat template uses it), true or false."""
    options = {"auto": None, "true": True, "false": False}
    if str(value).lower() not in options:
        raise ConfigError(f"chat must be auto, true or false, got {value!r}")
    return options[str(value).lower()]


def _fitting(items: list, prompt_of: Callable[[Any], str], tokenizer, context: int, new_tokens: int, what: str, fix: str) -> list:
    """The items whose prompt leaves room for `new_tokens` within the model's context; a warning counts the others."""
    from orl.text.encoding import encode_prompt

    fitting = [item for item in items if len(encode_prompt(tokenizer, prompt_of(item))) + new_tokens <= context]
    if not fitting:
        raise DataError(f"none of the {len(items)} {what} fits the model's context ({context} tokens) with {new_tokens} new tokens; {fix}")
    if len(fitting) < len(items):
        warnings.warn(f"skipped {len(items) - len(fitting)} of {len(items)} {what} longer than {context} - {new_tokens} tokens "
                      "(the context less the generated tokens)", stacklevel=3)
    return fitting


def _policy_path(cfg: DictConfig) -> str:
    """lm.model, or with init_from another LM run's trained policy (its run_dir/hf): offline then online for
    LMs, e.g. DPO then RLOO, that policy also being the new KL reference. The embedded tiny GPT-2 is built on
    first use."""
    lm = cfg.lm
    if cfg.get("init_from"):
        path = str(Path(str(cfg.init_from)) / "hf")
        if not Path(path, "config.json").exists():
            raise DataFileNotFound(f"init_from={cfg.init_from}: no Hugging Face model at {path}; give the run directory of an "
                                   "orl-train LM run (dpo, alol, rloo), which writes run_dir/hf")
        print(f"[orl] starting from the policy of {cfg.init_from}")
        return path
    path = str(lm.model)
    if path == str(lm.embedded_model):
        import contextlib

        from orl.envs.tiny_lm import build_tiny_lm

        first = contextlib.nullcontext()
        if world_size() > 1:  # data parallel: process 0 builds it, the others then load it
            from accelerate import PartialState

            first = PartialState().main_process_first()
        with first:
            if not Path(path, "config.json").exists():
                print(f"[orl] building the embedded tiny GPT-2 at {path} (first run only)")
            build_tiny_lm(path)  # reuses a build with the current settings, rebuilds an older orl's
    return path


def _hold_out(cfg: DictConfig, rows: list[dict]) -> tuple[list[dict], list[dict], list[int]]:
    """(training rows, held-out rows, their 0-based indices): lm.holdout of the distinct prompts, drawn with the run's
    seed, are held out with every row that has them. Evaluation uses those (generation prompts, a reward model's
    pairs, A-LoL's value prompts), so it never scores a row the agent trained on."""
    fraction = float(cfg.lm.get("holdout", 0.0))
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"lm.holdout={fraction}: the fraction of distinct prompts held out for evaluation must be in [0, 1)")
    # chat rows by their messages: a template that drops part of its generation prompt may split one conversation's
    # rendering at different points in different rows (orl.text.encoding.render_chat)
    def key(row: dict) -> str:
        return json.dumps(row["prompt_messages"], sort_keys=True) if "prompt_messages" in row else row["prompt"]

    prompts = list(dict.fromkeys(key(r) for r in rows))
    count = max(1, round(fraction * len(prompts))) if fraction > 0 else 0
    if count == 0 or count >= len(prompts):
        if count:
            warnings.warn(f"lm.holdout={fraction}: {cfg.dataset} has {len(prompts)} distinct prompt(s), too few to hold one out and "
                          "still train; give evaluation prompts with lm.eval_prompts=<file>", stacklevel=2)
        print(f"[orl] no row held out (lm.holdout={fraction}): evaluation uses training rows")
        return rows, [], []
    held = {prompts[i] for i in np.random.default_rng(int(cfg.seed)).permutation(len(prompts))[:count]}
    index = [i for i, row in enumerate(rows) if key(row) in held]
    shown = ", ".join(map(str, index[:10])) + (", ..." if len(index) > 10 else "")
    print(f"[orl] held out {count} of {len(prompts)} distinct prompts ({len(index)} rows: {shown}; every index in provenance.json) "
          f"for evaluation, never trained on (lm.holdout={fraction}, seed {cfg.seed}; lm.holdout=0 trains on every row)")
    return [row for row in rows if key(row) not in held], [rows[i] for i in index], index


def _prompt_file(spec, option: str) -> list[str]:
    """The prompts of a text file, one per line."""
    path = Path(str(spec))
    if not path.is_file():
        raise DataFileNotFound(f"{option}={path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{option}={path} holds no prompt")
    return prompts


def _eval_prompts(cfg: DictConfig, rows: list[dict]) -> list[str]:
    """lm.eval_prompts (a file, one prompt per line), else the distinct prompts of `rows` (the held-out ones), the last
    ones first."""
    lm = cfg.lm
    if lm.eval_prompts:
        return _prompt_file(lm.eval_prompts, "lm.eval_prompts")
    return list(dict.fromkeys(r["prompt"] for r in reversed(rows)))[: int(lm.num_eval_prompts)]
