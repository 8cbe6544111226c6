"""Capacity routing in the trainer's real loop: ZeRO-3 (every rank calls every layer and head, whatever
the level), the controller's level and its window of measurements saved with the checkpoint, and a
resume that repeats the steps after it exactly as the first run logged them."""

from __future__ import annotations

from .helpers import TINY, launch, resumed_at

CAPACITY = ["--exit-routing", "capacity", "--target-compute", "0.5", "--capacity-interval", "2"]
CAPACITY += ["--min-confidence", "0"]  # untrained heads: the target alone sets the level


def test_zero3_capacity_routing_trains_changes_level_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "capacity"
    args = [*TINY, "--deepspeed", "ds_configs/zero3.json", "--max-steps", "12", "--save-interval", "7", *CAPACITY]
    args += ["--no-export-hf"]
    killed = launch("deepspeed", run_dir, args, kill_at_save=12)
    assert killed.returncode != 0
    before = killed.metrics
    assert sorted(before) == list(range(1, 13)), killed.output[-6000:]
    levels = [before[step]["capacity_level"] for step in range(1, 13)]
    assert levels[:6] == [None] * 4 + [16, 16]  # exit warm-up, then full depth for the first window
    assert max(levels[6:]) < 16
    assert before[12]["compute_fraction"] < 0.75 and "forced_exit_share" in before[12]

    resumed = launch("deepspeed", run_dir, [*args, "--resume", "auto"]).check()
    assert resumed_at(killed, resumed) == 7  # the torn save of step 12 was skipped
    after = resumed.metrics
    for step in range(8, 13):
        assert after[step]["capacity_level"] == before[step]["capacity_level"], step
        assert after[step]["samples_digest"] == before[step]["samples_digest"], step
        assert abs(after[step]["loss"] - before[step]["loss"]) <= 1e-6 * abs(before[step]["loss"]), step
