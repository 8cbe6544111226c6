"""ZeRO-1 under torchrun and ZeRO-3 under mpirun: real 2-rank training, preemption, resume.

ZeRO-1: the job is preempted the way a scheduler does it (SIGTERM to every process of
the job, which torchrun also forwards); it must save a complete checkpoint at the step
it stopped, and `--resume auto` must continue from there. ZeRO-3 (ranks found through
mpi4py): rank 0 is SIGKILLed while saving step 12; the resumed run must repeat steps
7-12 exactly as the first run logged them before dying.
"""

from __future__ import annotations

import json
import os
import signal

from .helpers import TINY, finish, launch, resumed_at, start, wait_for_step

MARKER = "dsexit_checkpoint.json"


def _mean_loss(metrics: dict[int, dict], steps) -> float:
    return sum(metrics[step]["loss"] for step in steps) / len(steps)


def _preempt(process, run_dir, after_step: int):
    wait_for_step(run_dir, after_step, process)
    os.killpg(process.pid, signal.SIGTERM)  # every process of the job, launcher included
    return finish(process, run_dir, timeout=120)


def test_zero1_torchrun_preempted_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "zero1"
    args = [*TINY, "--deepspeed", "ds_configs/zero1.json", "--max-steps", "1000", "--save-interval", "1000"]
    first = _preempt(start("torchrun", run_dir, args), run_dir, after_step=8)
    stopped_at = max(first.metrics)
    assert (first.checkpoints / "latest").read_text() == f"global_step{stopped_at}"
    marker = json.loads((first.checkpoints / f"global_step{stopped_at}" / MARKER).read_text())
    assert marker["zero_stage"] == 1 and marker["samples_seen"] == 32 * stopped_at
    assert not (run_dir / "hf").exists(), "a preempted run saves and leaves; it does not export"
    assert _mean_loss(first.metrics, range(stopped_at - 2, stopped_at + 1)) < 0.9 * _mean_loss(first.metrics, (1, 2, 3))

    second = _preempt(start("torchrun", run_dir, [*args, "--resume", "auto"]), run_dir, after_step=stopped_at + 3)
    assert resumed_at(first, second) == stopped_at
    metrics = second.metrics
    assert sorted(metrics) == list(range(1, max(metrics) + 1))
    assert metrics[stopped_at + 1]["samples_seen"] == 32 * (stopped_at + 1)
    assert metrics[stopped_at + 1]["loss"] < 0.9 * _mean_loss(metrics, (1, 2, 3))  # continued, not restarted
    assert (second.checkpoints / "latest").read_text() == f"global_step{max(metrics)}"


def test_zero3_mpirun_trains_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "zero3"
    args = [*TINY, "--deepspeed", "ds_configs/zero3.json", "--max-steps", "12", "--save-interval", "6"]
    killed = launch("mpirun", run_dir, args, kill_at_save=12)
    assert killed.returncode != 0
    before = killed.metrics
    assert sorted(before) == list(range(1, 13)), killed.output[-6000:]
    assert _mean_loss(before, (10, 11, 12)) < 0.85 * _mean_loss(before, (1, 2, 3))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["launcher"] == "mpi"  # ranks came from mpi4py, not from launcher variables

    resumed = launch("mpirun", run_dir, [*args, "--resume", "auto"]).check()
    assert resumed_at(killed, resumed) == 6  # the torn save of step 12 was skipped
    after = resumed.metrics
    for step in range(7, 13):
        assert after[step]["samples_digest"] == before[step]["samples_digest"], step
        assert abs(after[step]["loss"] - before[step]["loss"]) <= 1e-6 * abs(before[step]["loss"]), step
    assert (resumed.checkpoints / "latest").read_text() == "global_step12"
    assert (run_dir / "hf" / "config.json").exists()  # exported from the ZeRO-3 shards at the end
