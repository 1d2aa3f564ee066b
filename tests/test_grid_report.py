"""scripts/grid.py's bookkeeping: where the switch is and how large the post-switch dip is."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("grid", Path(__file__).resolve().parent.parent / "scripts" / "grid.py")
grid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid)


def test_switch_step_prefers_the_recorded_switch():
    assert grid.switch_step({"steps": 1500, "switch_step": 0}) == 0  # SAC from scratch run with steps=0 as an override
    assert grid.switch_step({"steps": 1500, "switch_step": None}) == 1500
    assert grid.switch_step({"steps": 1500}) == 1500


def test_worst_drop_is_offline_score_minus_worst_online_evaluation():
    # switch at 1000: the pre-trained agent scores 40; the online phase bottoms out at 0 (a delayed collapse)
    curve = [(500, 30.0), (1000, 40.0), (1500, 10.0), (2000, 25.0), (3500, 0.0), (5000, 80.0)]
    assert grid.worst_drop({"steps": 1000, "curve": curve}) == pytest.approx(40.0)
    rising = [(1000, 40.0), (1500, 45.0), (2000, 50.0), (5000, 80.0)]
    assert grid.worst_drop({"steps": 1000, "curve": rising}) == pytest.approx(-5.0)  # negative: never below the start
    assert grid.worst_drop({"steps": 0, "switch_step": 0, "curve": [(500, 1.0)]}) == 0.0  # from scratch: nothing to drop from
