"""Session fixtures: launches shared by several trainer tests.

Runs that serve several tests are session fixtures, so the suite pays for each launch once.
"""

from __future__ import annotations

import pytest

from .helpers import ZERO2_ARGS, Launch, launch


# ---------------------------------------------------------------- shared runs
@pytest.fixture(scope="session")
def zero2_straight(tmp_path_factory) -> Launch:
    """2 ranks, ZeRO-2, 20 uninterrupted steps (checkpoints at 10 and 20, HF export at the end)."""
    return launch("deepspeed", tmp_path_factory.mktemp("zero2") / "straight", ZERO2_ARGS).check()


@pytest.fixture(scope="session")
def zero2_interrupted(tmp_path_factory) -> tuple[Launch, Launch]:
    """The same run killed (SIGKILL) in the middle of saving step 20, then `--resume auto`."""
    run_dir = tmp_path_factory.mktemp("zero2") / "interrupted"
    killed = launch("deepspeed", run_dir, ZERO2_ARGS, kill_at_save=20)
    assert killed.returncode != 0, "fault_entry.py did not kill the run"
    resumed = launch("deepspeed", run_dir, [*ZERO2_ARGS, "--resume", "auto"]).check()
    return killed, resumed
