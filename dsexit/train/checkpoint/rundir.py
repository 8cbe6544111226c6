"""A run directory belongs to one run: its identity, and what a new start may do with it.

    RUN_DIR/dsexit_run.json    {"run_id", "created_at", "started_from"}: written by rank 0
                               when training starts; every checkpoint marker repeats run_id
    RUN_DIR/dsexit.lock        an OS file lock rank 0 holds while it trains, and who holds it
                               (host, PID, start time): a second trainer on the directory is
                               refused; the lock goes with the process, so a restarted job
                               takes it again

`plan_run` decides, before any process group and without writing anything, what this
start is: a new run, the continuation of the run the directory holds (`--resume auto`),
a rollback of it to an older checkpoint (`--resume RUN_DIR/checkpoints/global_stepN`;
newer checkpoints move aside to checkpoints/rolled-back-TIMESTAMP/), or a fork of another
run's checkpoint into an unused directory. A new run in a used directory is refused; `--start-over` moves the old run
aside to RUN_DIR.old-TIMESTAMP (never deletes it) when training starts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from dsexit.storage import atomic_write
from dsexit.train.checkpoint.files import CheckpointRef, complete_checkpoints
from dsexit.train.metrics import LOG_FILE

RUN_FILE = "dsexit_run.json"
LOCK_FILE = "dsexit.lock"
# What a run leaves that makes its directory "used" (logs and caches alone do not).
RUN_ARTIFACTS = (RUN_FILE, "metrics.jsonl", "config.json", "hf")


class RunDirError(ValueError):
    """This start would mix two runs in one directory; one sentence saying what to do."""


@dataclass
class RunPlan:
    mode: str
    """'new', 'continue', 'rollback' or 'fork'."""
    run_id: str | None
    """The run continued; None for a new run (rank 0 makes the id when training starts)."""
    move_aside: tuple[str, ...] = ()
    """Directories to move aside before training (`--start-over`): the run directory, and a
    separate local checkpoint directory that holds checkpoints."""
    started_from: str | None = None
    rolled_back: tuple[str, ...] = ()
    """A rollback's newer steps (tags) on this node: moved aside into `rolled-back-TIMESTAMP/` before the
    new line reaches their numbers, so none is ever rewritten in place."""
    log_state: tuple[int, int, int] | None = None
    """(bytes, atime_ns, mtime_ns) of RUN_DIR/train.log before this start logged to it: the old
    run's log is put back as it was after the move (the first lines of this start landed in it)."""


def recorded_run(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as handle:
            recorded = json.load(handle)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirError(
            f"{os.path.join(run_dir, RUN_FILE)} is malformed ({error}); move it away or choose another --run-dir."
        ) from None
    return recorded if isinstance(recorded, dict) else None


def describe_use(run_dir: str, local_checkpoints: list[CheckpointRef], remote_steps: list[int]) -> str | None:
    """What makes the run directory (or its checkpoint location) used, or None if it is unused."""
    parts = []
    recorded = recorded_run(run_dir)
    if recorded:
        parts.append(f"run {recorded.get('run_id')}")
    elif any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_ARTIFACTS):
        parts.append("an earlier run's files")
    steps = sorted({ref.step for ref in local_checkpoints} | set(remote_steps))
    if steps:
        parts.append(f"checkpoints up to step {steps[-1]}")
    return " with ".join(parts) if parts else None


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def plan_run(
    *,
    run_dir: str,
    checkpoint_root: str,
    resume: str,
    start_over: bool,
    chosen: CheckpointRef | None,
    remote_steps: list[int],
    remote_shown: str | None,
) -> RunPlan:
    """What this start is; raises RunDirError (one sentence) where it would mix two runs.

    `chosen` is the checkpoint `--resume` selects (None for 'none', or 'auto' with nothing to
    resume); `remote_steps` are the complete checkpoints on the mirror, if there is one."""
    local = complete_checkpoints(checkpoint_root)
    used = describe_use(run_dir, local, remote_steps)
    recorded = recorded_run(run_dir) or {}
    explicit = resume not in ("auto", "none")
    rollback = explicit and chosen is not None and _inside(chosen.path, checkpoint_root)
    if start_over:
        if remote_steps:
            raise RunDirError(
                f"--start-over cannot move the checkpoints at {remote_shown} aside; choose another "
                f"--checkpoint-dir for the new run."
            )
        if rollback:
            raise RunDirError(
                f"--start-over with resume={resume!r} would move that checkpoint aside; resume it "
                f"without --start-over, or from its new place after the move."
            )
        aside = (run_dir,) if used is not None else ()
        if local and not _inside(checkpoint_root, run_dir):
            aside += (checkpoint_root,)
        return RunPlan(
            "fork" if explicit else "new",
            None,
            move_aside=aside,
            started_from=chosen.path if explicit and chosen else None,
            log_state=_log_state(run_dir),
        )
    aside = (
        f"pass --start-over to move it aside to {run_dir}.old-TIMESTAMP (nothing is deleted), or choose "
        f"another --run-dir."
    )
    hint = f"resume it with --resume auto, or {aside}"
    if chosen is None:
        if used is not None and resume == "none":
            raise RunDirError(
                f"run_dir={run_dir!r} already holds {used}; a new run (--resume none) would mix with it: {hint}"
            )
        if used is not None:
            raise RunDirError(
                f"run_dir={run_dir!r} already holds {used} but no complete checkpoint to resume; a new "
                f"run would mix with it: {aside}"
            )
        return RunPlan("new", None)
    theirs, ours = chosen.meta.get("run_id"), recorded.get("run_id")
    if rollback:  # newer steps of this run move aside; `latest` will name the one resumed
        newer = tuple(ref.tag for ref in local if ref.step > chosen.step)
        newer_remote = any(step > chosen.step for step in remote_steps)
        mode = "rollback" if newer or newer_remote else "continue"
        return RunPlan(mode, ours or theirs, started_from=chosen.path, rolled_back=newer)
    if explicit:
        if used is not None:
            raise RunDirError(
                f"run_dir={run_dir!r} already holds {used}; starting from another run's checkpoint "
                f"{chosen.path} there would mix the two: {hint}"
            )
        return RunPlan("fork", None, started_from=chosen.path)
    if ours and theirs and ours != theirs:
        raise RunDirError(
            f"run_dir={run_dir!r} holds run {ours}, but the checkpoint --resume auto found "
            f"({chosen.tag}) belongs to run {theirs}; resume that run from its own run directory, "
            f"or {aside}"
        )
    return RunPlan("continue", ours or theirs, started_from=chosen.path)


def _log_state(run_dir: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(os.path.join(run_dir, LOG_FILE))
    except OSError:
        return None
    return stat.st_size, stat.st_atime_ns, stat.st_mtime_ns


def restore_log(moved_run_dir: str, log_state: tuple[int, int, int] | None) -> None:
    """Cut what this start appended to the old run's log before the move; keep its times."""
    path = os.path.join(moved_run_dir, LOG_FILE)
    if log_state is None:
        if os.path.exists(path):
            os.remove(path)  # the old run had no log: every line in it is this start's
        return
    size, atime_ns, mtime_ns = log_state
    os.truncate(path, size)
    os.utime(path, ns=(atime_ns, mtime_ns))


def move_aside(paths: tuple[str, ...]) -> dict[str, str]:
    """Rename each directory to NAME.old-TIMESTAMP (NAME.old-TIMESTAMP-N if that exists); {old: new}."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        target, suffix = f"{path.rstrip('/')}.old-{stamp}", 1
        while os.path.exists(target):
            target, suffix = f"{path.rstrip('/')}.old-{stamp}-{suffix}", suffix + 1
        os.rename(path, target)
        moved[path] = target
    return moved


ROLLED_BACK = "rolled-back-"


def roll_aside(checkpoint_root: str, tags: tuple[str, ...], stamp: str) -> str | None:
    """Move `tags` (a rollback's newer steps) into checkpoint_root/rolled-back-STAMP/, one rename each:
    a kill at any moment leaves every step in one of the two places. Returns the folder (None: nothing
    to move)."""
    present = [tag for tag in tags if os.path.isdir(os.path.join(checkpoint_root, tag))]
    if not present:
        return None
    folder = os.path.join(checkpoint_root, f"{ROLLED_BACK}{stamp}")
    os.makedirs(folder, exist_ok=True)
    for tag in present:
        os.rename(os.path.join(checkpoint_root, tag), os.path.join(folder, tag))
    return folder


_held_locks: dict[str, int] = {}  # run directory -> the descriptor holding its lock, for the process's life


def lock_run_dir(run_dir: str) -> None:
    """Hold RUN_DIR/dsexit.lock for the rest of this process (rank 0), writing who holds it; RunDirError
    naming the holder when another process does. Taking it again (the directory moved) is allowed."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(handle, 4096).decode(errors="replace").strip()
        os.close(handle)
        try:
            shown = "PID {pid} on host {host}, started {started}".format(**json.loads(holder))
        except (ValueError, KeyError, TypeError):
            shown = "another process"
        raise RunDirError(
            f"run_dir={run_dir!r} is in use by another trainer ({shown}); two runs in one directory would "
            "overwrite each other's checkpoints and logs: wait for it to end, stop it, or choose another --run-dir."
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(handle, 0)
    os.pwrite(handle, (json.dumps(holder) + "\n").encode(), 0)
    previous = _held_locks.pop(run_dir, None)
    if previous is not None:
        os.close(previous)
    _held_locks[run_dir] = handle


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def claim(run_dir: str, plan: RunPlan, run_id: str) -> None:
    """Record the run's identity in its directory when training starts (rank 0)."""
    recorded = recorded_run(run_dir)
    if recorded and recorded.get("run_id") == run_id:
        return
    os.makedirs(run_dir, exist_ok=True)
    atomic_write(
        os.path.join(run_dir, RUN_FILE),
        json.dumps(
            {
                "run_id": run_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "started_from": plan.started_from,
                "mode": plan.mode,
            },
            indent=1,
        ),
    )
