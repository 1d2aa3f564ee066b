"""orl: offline and offline-to-online reinforcement learning.

Public surface: `make_agent`, `make_dataset`, `Trainer`, `TrainerConfig`, `evaluate`, `Batch`.
"""
from orl.agent import Agent, make_agent, register
from orl.buffer import Batch, TransitionBuffer
from orl.data import DataConfig, DatasetError, OfflineDataset, make_dataset, prepare
from orl.evaluation import EvalResult, evaluate
from orl.trainer import Trainer, TrainerConfig

__all__ = [
    "Agent",
    "Batch",
    "DataConfig",
    "DatasetError",
    "EvalResult",
    "OfflineDataset",
    "Trainer",
    "TrainerConfig",
    "TransitionBuffer",
    "evaluate",
    "make_agent",
    "make_dataset",
    "prepare",
    "register",
]
__version__ = "0.1.0"
