"""Which checkpoints a run keeps, here and on its mirror; plain functions over markers.

After each save the newest `keep_last` of this run's complete checkpoints no newer than the
one just saved are kept, and always that one and whatever `latest` names. Only this run's
checkpoints count (their markers carry its run id); newer steps (an abandoned line after a
rollback) and other runs' checkpoints are never removed, and a torn save older than the
one just saved goes with the others. Every node's local rank 0 deletes the same names from
its own checkpoint directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from dsexit.storage import redact_text
from dsexit.train.checkpoint.files import (
    LATEST,
    UNIVERSAL_DIR,
    CheckpointRef,
    complete_checkpoints,
    read_latest,
    step_of,
)
from dsexit.train.cluster.distributed import WorldInfo, barrier, broadcast_object

if TYPE_CHECKING:
    from dsexit.train.checkpoint.mirror import CheckpointMirror

log = logging.getLogger("dsexit")


def is_ours(meta: dict[str, Any], run_id: str | None) -> bool:
    """Whether a marker belongs to the run `run_id` (None: every marker does)."""
    return run_id is None or meta.get("run_id") == run_id


def kept_tags(
    complete: dict[str, dict[str, Any]], saved: CheckpointRef, latest: str | None, keep_last: int, run_id: str | None
) -> set[str]:
    """Of `complete` ({tag: marker}): the newest `keep_last` of this run's no newer than `saved`,
    plus `saved` and `latest`."""
    ours = sorted(
        (meta["step"], tag) for tag, meta in complete.items() if is_ours(meta, run_id) and meta["step"] <= saved.step
    )
    return {tag for _, tag in ours[-keep_last:]} | {saved.tag} | ({latest} if latest else set())


def doomed_tags(
    names: list[str], complete: dict[str, dict[str, Any]], kept: set[str], saved: CheckpointRef, run_id: str | None
) -> list[str]:
    """Of `names`: this run's complete checkpoints outside `kept`, and torn saves, no newer than `saved`."""
    doomed = []
    for name in names:
        step = step_of(name)
        if step is None or name in kept or step > saved.step:
            continue
        meta = complete.get(name)
        if (meta is None and step < saved.step) or (meta is not None and is_ours(meta, run_id)):
            doomed.append(name)
    return doomed


def kept_here(root: str, saved: CheckpointRef, keep_last: int, run_id: str | None) -> list[CheckpointRef]:
    """The complete checkpoints under `root` that retention keeps."""
    complete = {ref.tag: ref.meta for ref in complete_checkpoints(root)}
    kept = kept_tags(complete, saved, read_latest(root), keep_last, run_id)
    return [CheckpointRef(root, tag, complete[tag]) for tag in kept if tag in complete]


def prune(
    root: str,
    world: WorldInfo,
    keep_last: int,
    run_id: str | None,
    saved: CheckpointRef | None = None,
    mirror: CheckpointMirror | None = None,
) -> None:
    """Delete what retention does not keep, under `root` on every node and on the mirror; `saved`
    defaults to the newest complete checkpoint. Called on every rank."""
    doomed_here: list[str] = []
    if world.is_main:
        refs = complete_checkpoints(root)
        complete = {ref.tag: ref.meta for ref in refs}
        saved = saved or (refs[-1] if refs else None)
        if saved is not None:
            kept = kept_tags(complete, saved, read_latest(root), keep_last, run_id)
            doomed_here = doomed_tags(os.listdir(root), complete, kept, saved, run_id)
            if mirror is not None:
                _prune_mirror(
                    mirror, saved, keep_last, run_id, {ref.tag for ref in kept_here(root, saved, keep_last, run_id)}
                )
    for name in broadcast_object(doomed_here):
        if world.local_rank == 0:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            shutil.rmtree(os.path.join(root, UNIVERSAL_DIR, name), ignore_errors=True)
    universal = os.path.join(root, UNIVERSAL_DIR)
    if (
        world.local_rank == 0
        and os.path.isdir(universal)
        and not any(step_of(name) is not None for name in os.listdir(universal))
    ):
        shutil.rmtree(universal, ignore_errors=True)  # only DeepSpeed's latest_universal was left
    barrier()


def _prune_mirror(
    mirror: CheckpointMirror, saved: CheckpointRef, keep_last: int, run_id: str | None, kept_locally: set[str]
) -> None:
    """The same rule on the mirror (rank 0); what the local copy keeps stays there too. Failures
    are warnings: the next save tries again."""
    remote = mirror.remote
    try:
        markers = mirror.index.markers()
        latest = (remote.read_text(LATEST) or "").strip() or None
        kept = kept_tags(markers, saved, latest, keep_last, run_id) | kept_locally
        for name in doomed_tags(remote.tags(), markers, kept, saved, run_id):
            remote.delete(name)
    except OSError as error:
        log.warning(
            "could not prune %s (%s); it is tried again at the next save", remote.shown, redact_text(str(error))
        )
