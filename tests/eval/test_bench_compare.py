"""The arithmetic of bench/pretrain_vs_exit.py: time to reach the baseline, and when it is undefined."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "pretrain_vs_exit", Path(__file__).resolve().parents[2] / "bench" / "pretrain_vs_exit.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look themselves up there
_spec.loader.exec_module(bench)


def _accuracy(dev: float, test: float) -> dict:
    return {"median": {"dev": {"accuracy": dev}, "test": {"accuracy": test}}}


def _arm(name: str, early_exit: bool, points: list[tuple[float, float, float]]) -> dict:
    return {"arm": name, "early_exit": early_exit,
            "evaluated": [{"seconds": seconds, "finetune": _accuracy(dev, test)} for seconds, dev, test in points]}


def test_exit_arm_that_reaches_the_baseline_sooner_saves_that_share_of_time():
    results = {"scratch": _accuracy(0.60, 0.60), "arms": [
        _arm("baseline", False, [(500.0, 0.66, 0.65), (1000.0, 0.70, 0.69)]),
        _arm("exit-0.75", True, [(500.0, 0.68, 0.67), (1000.0, 0.72, 0.71)]),
        _arm("exit-0.50", True, [(500.0, 0.65, 0.64), (1000.0, 0.69, 0.68)]),
    ]}
    saved, delta, best = bench.compare(results)
    # exit-0.75 reaches 0.70 halfway between 500 s (0.68) and 1000 s (0.72): at 750 s.
    assert best == "exit-0.75"
    assert saved == pytest.approx(25.0)
    assert delta == pytest.approx(0.02)
    arms = {arm["arm"]: arm for arm in results["arms"]}
    assert arms["exit-0.50"]["time_saved_pct"] is None and arms["exit-0.50"]["minutes_to_baseline_dev"] is None
    assert arms["baseline"]["time_saved_pct"] == pytest.approx(0.0)


def test_time_saved_is_undefined_when_pre_training_does_not_beat_the_untrained_model():
    results = {"scratch": _accuracy(0.65, 0.69), "arms": [
        _arm("baseline", False, [(500.0, 0.6167, 0.5881), (1000.0, 0.6167, 0.5881)]),
        _arm("exit-0.50", True, [(500.0, 0.6167, 0.5881), (1000.0, 0.6167, 0.5881)]),
    ]}
    saved, delta, best = bench.compare(results)
    assert math.isnan(saved) and delta == pytest.approx(0.0) and best == "exit-0.50"
    assert results["baseline_beats_scratch"] is False


def test_time_to_reach_interpolates_and_reports_never():
    curve = [(0.0, 0.5), (10.0, 0.6), (20.0, 0.8)]
    assert bench.time_to_reach(curve, 0.7) == pytest.approx(15.0)
    assert bench.time_to_reach(curve, 0.4) == 0.0
    assert bench.time_to_reach(curve, 0.9) is None
