"""A run directory belongs to one run, a rollback moves newer checkpoints aside intact, a step is rewritten
atomically, and a resume that does not fit is refused in one line - with real processes.

One process (the plain `python` launcher), electra-tiny, a checkpoint every step. A
module fixture trains 4 steps once; each test works on its own copy of that run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from .helpers import TINY, finish, launch, resumed_at, start, wait_for_step

MARKER = "dsexit_checkpoint.json"
RUN_FILE = "dsexit_run.json"
LOCK = "dsexit.lock"
ARGS = [*TINY, "--max-steps", "4", "--save-interval", "1", "--keep-last", "4", "--eval-interval", "0", "--no-export-hf"]


def without(args: list[str], flag: str) -> list[str]:
    """`args` less one flag and its value."""
    at = args.index(flag)
    return args[:at] + args[at + 2 :]


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("pretrain.py: error:")]


def tags(checkpoints) -> list[str]:
    return sorted((path.name for path in checkpoints.glob("global_step*")), key=lambda name: int(name[11:]))


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file's size and time, but the directory's lock (whoever holds it rewrites it)."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and path.name != LOCK
    }


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    run = launch("python", tmp_path_factory.mktemp("identity") / "run", ARGS, nproc=1).check()
    assert tags(run.checkpoints) == [f"global_step{step}" for step in (1, 2, 3, 4)]
    return run


@pytest.fixture
def used_run_dir(four_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps.run_dir, run_dir, symlinks=True)
    return run_dir


def test_every_checkpoint_records_the_run_and_the_digests_of_its_files(four_steps):
    run_id = json.loads((four_steps.run_dir / RUN_FILE).read_text())["run_id"]
    marker = json.loads((four_steps.checkpoints / "global_step4" / MARKER).read_text())
    assert marker["run_id"] == run_id
    on_disk = {path.name for path in (four_steps.checkpoints / "global_step4").iterdir()} - {MARKER}
    assert set(marker["files"]) == on_disk and all(len(entry["sha256"]) == 64 for entry in marker["files"].values())


def test_a_new_run_or_another_model_in_a_used_directory_is_one_line_and_touches_nothing(used_run_dir):
    before = snapshot(used_run_dir)
    run_id = json.loads((used_run_dir / RUN_FILE).read_text())["run_id"]
    refused = launch("python", used_run_dir, [*ARGS, "--resume", "none"], nproc=1)
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = errors(refused.output)
    assert f"already holds run {run_id}" in line and "--start-over" in line and "Traceback" not in refused.output

    other_model = launch("python", used_run_dir, [*ARGS, "--model", "electra-small", "--resume", "auto"], nproc=1)
    assert other_model.returncode == 2, other_model.output[-3000:]
    [line] = errors(other_model.output)
    assert "another shape" in line and "hidden_size=" in line and "Traceback" not in other_model.output
    assert snapshot(used_run_dir) == before


def test_rollback_moves_newer_checkpoints_aside_intact_and_a_kill_mid_save_falls_back(four_steps, used_run_dir):
    checkpoints = used_run_dir / "checkpoints"
    newer = {step: snapshot(checkpoints / f"global_step{step}") for step in (3, 4)}
    rollback = launch(
        "python",
        used_run_dir,
        [*ARGS, "--keep-last", "1", "--resume", str(checkpoints / "global_step2")],
        nproc=1,
        kill_at_save=3,
    )
    assert rollback.returncode != 0, "fault_entry.py did not kill the run"
    assert resumed_at(four_steps, rollback) == 2  # the rollback continued from the step it was given
    [aside] = checkpoints.glob("rolled-back-*")
    assert "moved aside to" in rollback.output and str(aside) in rollback.output
    for step, files in newer.items():  # the abandoned line's steps, untouched, whatever the kill interrupted
        assert snapshot(aside / f"global_step{step}") == files
    assert not (checkpoints / "global_step4").exists() and not (checkpoints / "global_step3" / MARKER).exists()
    assert (checkpoints / "latest").read_text() == "global_step2"

    resumed = launch("python", used_run_dir, [*ARGS, "--keep-last", "1", "--resume", "auto"], nproc=1).check()
    assert resumed_at(rollback, resumed) == 2  # the torn step 3 was skipped
    for step in (3, 4):  # the rolled-back line repeats the original one exactly
        assert resumed.metrics[step]["samples_digest"] == four_steps.metrics[step]["samples_digest"]
        assert (
            abs(resumed.metrics[step]["loss"] - four_steps.metrics[step]["loss"])
            <= 1e-6 * four_steps.metrics[step]["loss"]
        )
    assert sorted(resumed.metrics) == [1, 2, 3, 4]
    # keep-last 1 never took the checkpoint just saved: the run ends on a complete step 4
    assert tags(checkpoints) == ["global_step4"] and (checkpoints / "latest").read_text() == "global_step4"
    assert (checkpoints / "global_step4" / MARKER).exists()
    for step, files in newer.items():  # retention leaves the rolled-back steps alone
        assert snapshot(aside / f"global_step{step}") == files


def test_a_second_trainer_on_a_running_directory_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    args = [*without(ARGS, "--max-steps"), "--max-steps", "400"]
    first = start("python", run_dir, args, nproc=1)
    try:
        wait_for_step(run_dir, 2, first)
        before = (run_dir / "metrics.jsonl").read_text()
        second = launch("python", run_dir, [*args, "--resume", "auto"], nproc=1)
        assert second.returncode == 2, second.output[-3000:]
        [line] = errors(second.output)
        assert "in use by another trainer" in line and f"PID {first.pid} " in line, line
        assert "Traceback" not in second.output
        assert (run_dir / "metrics.jsonl").read_text().startswith(before)  # the first run's records, alone
        assert first.poll() is None  # the first trainer goes on
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # it saves a checkpoint and stops
        stopped = finish(first, run_dir)
    assert stopped.returncode == 0, stopped.output[-3000:]
    steps = [json.loads(line)["step"] for line in stopped.metrics_text.splitlines() if '"step"' in line]
    assert steps == sorted(set(steps))  # one writer: no step twice, none out of order


def test_start_over_moves_the_old_run_aside_and_a_one_step_run_works(used_run_dir):
    old_id = json.loads((used_run_dir / RUN_FILE).read_text())["run_id"]
    before = snapshot(used_run_dir)
    no_warmup = without(ARGS, "--warmup-steps")  # derived, so that one step works
    fresh = launch(
        "python", used_run_dir, [*no_warmup, "--max-steps", "1", "--resume", "none", "--start-over"], nproc=1
    ).check()
    [moved] = [path for path in used_run_dir.parent.iterdir() if path.name.startswith("run.old-")]
    assert snapshot(moved) == before  # nothing of the old run was lost or changed
    assert json.loads((used_run_dir / RUN_FILE).read_text())["run_id"] != old_id
    assert sorted(fresh.metrics) == [1] and tags(used_run_dir / "checkpoints") == ["global_step1"]
