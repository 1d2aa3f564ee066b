"""orl-prefs: preference labels from an orl dataset, and reward models from labels (see `orl-prefs --help`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from orl.data import make_dataset
from orl.errors import DataError, OrlError
from orl.prefs.importers import load_preference_transformer_labels, load_uni_rlhf_labels
from orl.prefs.labels import PreferencePairs, Teacher, scripted_preferences, scripted_scores
from orl.prefs.reward_model import RewardModelConfig, train_reward_model
from orl.prefs.store import save_reward_model
from orl.prefs.transformer import PreferenceTransformerConfig, train_preference_transformer


def prefs_main(argv: list[str] | None = None) -> None:
    """orl-prefs: from an orl dataset to preference labels, and from labels to a reward model.

        orl-prefs label orl/hopper/medium-replay-v0 --queries 2000 --length 50 --out prefs.npz [--mistake 0.1]
        orl-prefs label orl/hopper/medium-replay-v0 --scores --queries 2000 --length 50 --out scores.npz   # CPL's dense mode
        orl-prefs reward orl/hopper/medium-replay-v0 prefs.npz --out runs/rm/hopper
        orl-train agent=iql dataset=orl/hopper/medium-replay-v0 data.reward=learned:runs/rm/hopper      # P-IQL
    """
    parser = argparse.ArgumentParser(prog="orl-prefs", description=prefs_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    label = sub.add_parser("label", help="scripted preference labels over segment pairs of a dataset")
    label.add_argument("dataset", help="a Minari id, D4RL name or .npz/.hdf5 path (as orl-train's dataset=)")
    label.add_argument("--queries", type=int, default=2000)
    label.add_argument("--length", type=int, default=50, help="segment length H")
    label.add_argument("--beta", type=float, default=math.inf, help="stochastic teacher: P(a > b) = sigmoid(beta (R_a - R_b)); inf = rational")
    label.add_argument("--gamma", type=float, default=1.0, help="myopic teacher: step t of H weighs gamma^(H-1-t)")
    label.add_argument("--mistake", type=float, default=0.0, help="flip each label with this probability")
    label.add_argument("--tie-threshold", type=float, default=0.0, help="returns closer than this are a tie (label 0.5)")
    label.add_argument("--skip-threshold", type=float, default=None, help="drop queries where neither return reaches this")
    label.add_argument("--scores", action="store_true",
                       help="score --queries distinct segments by their (--gamma weighted) return instead of labelling pairs: "
                            "CPL's dense score mode, where every two segments of a batch are a comparison")
    label.add_argument("--seed", type=int, default=0)
    label.add_argument("--out", required=True, help="label file (.npz)")
    imported = sub.add_parser("import-uni-rlhf", help="Uni-RLHF crowd-sourced labels (pickled index/label files) -> an orl label file")
    imported.add_argument("dataset", help="the dataset the labels index (D4RL layout, e.g. hopper-medium-replay-v2)")
    imported.add_argument("directory", help="the <env>_human_labels folder")
    imported.add_argument("--queries", type=int, required=True)
    imported.add_argument("--length", type=int, required=True)
    imported.add_argument("--out", required=True)
    imported_pt = sub.add_parser("import-pt", help="Preference Transformer's human labels (human_label/<env>/ pickles) -> an orl label file")
    imported_pt.add_argument("dataset", help="the dataset the labels index (D4RL layout, e.g. hopper-medium-replay-v2)")
    imported_pt.add_argument("directory", help="the human_label/<env> folder (indices_num*, indices_2_num*, label_human)")
    imported_pt.add_argument("--length", type=int, required=True, help="segment length the labels were made with (PT: 100 on MuJoCo)")
    imported_pt.add_argument("--queries", type=int, default=None, help="use the last N labels, as PT's loader (default: all)")
    imported_pt.add_argument("--out", required=True)
    reward = sub.add_parser("reward", help="train a Bradley-Terry reward ensemble on labels")
    reward.add_argument("dataset")
    reward.add_argument("labels", help="a label file from `orl-prefs label` made on this dataset")
    reward.add_argument("--out", required=True, help="directory for reward_model.pt and metrics.json")
    reward.add_argument("--model", choices=("mlp", "transformer"), default="mlp",
                        help="mlp: Uni-RLHF's MLP ensemble (Markovian); transformer: Preference Transformer (non-Markovian)")
    reward.add_argument("--ensemble-size", type=int, default=RewardModelConfig.ensemble_size)
    reward.add_argument("--max-epochs", type=int, default=None,
                        help=f"mlp: at most this many (default {RewardModelConfig.max_epochs}); transformer: exactly (default 100)")
    reward.add_argument("--window", type=int, default=25, help="transformer: relabelling window (the official seq_len)")
    reward.add_argument("--stop-accuracy", type=float, default=RewardModelConfig.stop_accuracy)
    reward.add_argument("--held-out", type=float, default=RewardModelConfig.held_out)
    reward.add_argument("--seed", type=int, default=0)
    reward.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small networks; a second thread only contends on shared machines
    try:
        dataset = make_dataset(args.dataset)
        if args.command == "import-uni-rlhf":
            pairs = load_uni_rlhf_labels(args.directory, dataset, args.queries, args.length)
            pairs.save(args.out)
            print(f"[orl-prefs] {len(pairs)} Uni-RLHF queries ({float((pairs.labels == 0.5).mean()):.0%} ties) -> {args.out}")
        elif args.command == "import-pt":
            pairs = load_preference_transformer_labels(args.directory, dataset, args.length, args.queries)
            pairs.save(args.out)
            print(f"[orl-prefs] {len(pairs)} Preference Transformer queries ({float((pairs.labels == 0.5).mean()):.0%} ties) -> {args.out}")
        elif args.command == "label" and args.scores:
            noisy = [flag for flag, value, default in (("--beta", args.beta, math.inf), ("--mistake", args.mistake, 0.0),
                     ("--tie-threshold", args.tie_threshold, 0.0), ("--skip-threshold", args.skip_threshold, None)) if value != default]
            if noisy:
                raise DataError(f"{', '.join(noisy)} label pairs; --scores gives each segment its return (only --gamma applies)")
            scored = scripted_scores(dataset, args.queries, args.length, args.gamma, args.seed)
            scored.save(args.out)
            print(f"[orl-prefs] {len(scored)} scored segments of {args.length} steps from {dataset.source} -> {args.out}")
        elif args.command == "label":
            teacher = Teacher(args.beta, args.gamma, args.mistake, args.tie_threshold, args.skip_threshold)
            pairs = scripted_preferences(dataset, args.queries, args.length, teacher, args.seed)
            pairs.save(args.out)
            ties = float((pairs.labels == 0.5).mean())
            print(f"[orl-prefs] {len(pairs)} queries of {args.length} steps from {dataset.source} ({ties:.0%} ties) -> {args.out}")
        else:
            pairs = PreferencePairs.load(args.labels, dataset)
            if args.model == "transformer":
                transformer_cfg = PreferenceTransformerConfig(epochs=args.max_epochs or PreferenceTransformerConfig.epochs, held_out=args.held_out, window=args.window, seed=args.seed)
                model, metrics = train_preference_transformer(dataset, pairs, transformer_cfg, args.device)
            else:
                cfg = RewardModelConfig(ensemble_size=args.ensemble_size, max_epochs=args.max_epochs or RewardModelConfig.max_epochs, stop_accuracy=args.stop_accuracy,
                                        held_out=args.held_out, seed=args.seed)
                model, metrics = train_reward_model(dataset, pairs, cfg, args.device)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            save_reward_model(out / "reward_model.pt", model.cpu(), pairs, metrics)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            print(f"[orl-prefs] reward model -> {out / 'reward_model.pt'}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    except OrlError as exc:
        print(f"orl-prefs: error: {exc}", file=sys.stderr)
        sys.exit(2)
