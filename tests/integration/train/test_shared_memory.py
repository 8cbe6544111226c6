"""DeepSpeed's CPU all-reduce workspace leaves nothing in /dev/shm, even when the job is killed.

On one machine DeepSpeed maps a 66 MiB shared-memory segment per rank and never unlinks it;
before dsexit removed the names, every test launch left 132 MiB of memory behind. Here a
two-rank run is inspected while it trains (its ranks map the segments, already unlinked)
and then SIGKILLed as a lost machine would be: no segment may outlive it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .helpers import TINY, finish, start, wait_for_step

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def _segments() -> set[str]:
    return {path.name for path in SHM.glob(f"{PREFIX}*")}


def _mapped_segments(pid: int) -> list[str]:
    """The job's processes' mappings of DeepSpeed workspaces ("... (deleted)" once unlinked)."""
    lines = []
    for task in Path("/proc").iterdir():
        if not task.name.isdigit():
            continue
        try:
            if os.getpgid(int(task.name)) != pid:
                continue
            lines += [line for line in (task / "maps").read_text().splitlines() if PREFIX in line]
        except (OSError, ProcessLookupError):
            continue
    return lines


def test_a_killed_two_rank_job_leaves_no_shared_memory(tmp_path):
    before = _segments()
    process = start("deepspeed", tmp_path / "run", [*TINY, "--max-steps", "400", "--save-interval", "400"])
    wait_for_step(tmp_path / "run", 2, process)
    mapped = _mapped_segments(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    finish(process, tmp_path / "run", timeout=60)
    assert mapped, "the ranks use DeepSpeed's shared-memory all-reduce (both on this machine)"
    assert all(line.endswith("(deleted)") for line in mapped), mapped
    assert _segments() - before == set()
