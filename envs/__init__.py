"""Environment adapters. `make_env(id)` builds any gymnasium id (MuJoCo control tasks included)."""
from orl.envs.control import make_env

__all__ = ["make_env"]
