"""Which checkpoint a start resumes from: one rule, read before the run and applied on every node.

`choose_checkpoint` is the rule, on markers alone (nothing is downloaded): `--resume none`
takes nothing, a path takes that checkpoint, and `auto` takes what `latest` names in the
checkpoint directory (else its newest complete checkpoint) unless the mirror holds a newer
one. Resolution (config/resolve.py) reads the choice before any process group, to check that
it fits the run and to plan the run directory; `find_resume` applies the same rule on rank 0
once the process group exists, and makes the choice present and verified on every node:

- a checkpoint complete on rank 0's disk alone (its upload cut short by a lost node, so the
  other nodes cannot load it) gives way to the mirror's choice;
- a choice on the mirror is downloaded, by rank 0 first (a shared disk is written once),
  then by every node whose own disk lacks it;
- without a mirror every node must see the checkpoint directory; every rank raises the same
  CheckpointError if any node lacks the checkpoint or any file fails its digest.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from typing import Any

from dsexit.train.checkpoint.files import (
    CheckpointRef,
    RemoteCheckpoints,
    open_checkpoint,
    read_marker,
    resume_choice,
    valid_marker,
    verify_files,
)
from dsexit.train.checkpoint.mirror import CheckpointMirror
from dsexit.train.cluster.distributed import WorldInfo, barrier, broadcast_object, gather_objects, several_processes
from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")


def choose_checkpoint(
    resume: str,
    root: str,
    mirror: RemoteCheckpoints | None = None,
    markers: dict[str, dict[str, Any]] | None = None,
) -> CheckpointRef | None:
    """The checkpoint `--resume` selects, by its marker: None for 'none' (or 'auto' with nothing to
    resume); the checkpoint a path names; for 'auto', the one `latest` names under `root` (else the
    newest complete) unless the mirror's choice (from its `markers`, else read) is newer.
    FileNotFoundError or CheckpointError when a path names no usable checkpoint."""
    if resume == "none":
        return None
    if resume != "auto":
        return open_checkpoint(resume)
    local = resume_choice(root)
    remote = mirror.choice(markers) if mirror is not None else None
    return remote if remote is not None and (local is None or remote.step > local.step) else local


def find_resume(resume: str, root: str, world: WorldInfo, mirror: CheckpointMirror | None) -> CheckpointRef | None:
    """Rank 0's `choose_checkpoint`, present under `root` (downloaded from the mirror if need be) and
    verified on every node; None for a new run. Called on every rank."""
    if resume == "none":
        return None
    chosen, markers = None, {}
    if world.is_main:  # rank 0 chooses; nodes with their own disks may hold other steps
        markers = mirror.index.markers() if mirror is not None and resume == "auto" else {}
        chosen = choose_checkpoint(resume, root, mirror.index if mirror is not None else None, markers)
    if mirror is not None and resume == "auto":
        chosen = _held_by_every_node(chosen, markers, root, world, mirror)
    if world.is_main and mirror is not None and chosen is not None and chosen.root == mirror.url:
        log.info("downloading checkpoint %s from %s", chosen.tag, mirror.shown)
        shutil.rmtree(os.path.join(root, chosen.tag), ignore_errors=True)
        mirror.download(chosen.tag, root)
        chosen = CheckpointRef(root, chosen.tag, read_marker(os.path.join(root, chosen.tag)))
    return _on_every_node(chosen, root, world, mirror)


def _held_by_every_node(
    chosen: CheckpointRef | None,
    markers: dict[str, dict[str, Any]],
    root: str,
    world: WorldInfo,
    mirror: CheckpointMirror,
) -> CheckpointRef | None:
    """Rank 0's choice, unless it is a local checkpoint that the mirror lacks and the nodes of this job
    cannot load: a save whose upload a lost node cut short is complete on rank 0's disk alone, or its
    marker is on every node here but the lost node's shards are on none (nor on the mirror). Then the
    mirror's choice stands (if the mirror has none, rank 0's, which then fails in `_on_every_node` naming
    the hosts that lack it)."""
    local_only = world.is_main and chosen is not None and chosen.root == root and chosen.tag not in markers
    tag = broadcast_object(chosen.tag if local_only else None)
    if tag is None:
        return chosen
    held = gather_objects(_files_held(os.path.join(root, tag)) if world.local_rank == 0 else None)
    if not world.is_main:
        return chosen
    nodes = [node for node in held if node is not None]
    present = set().union(*(files for _, files in nodes))
    if not all(has_marker for has_marker, _ in nodes):
        why = "is complete on this node only"
    elif not set(chosen.meta.get("files", {})) <= present:
        why = "lacks shards that only a node gone from the job held"
    else:
        return chosen
    fallback = mirror.index.choice(markers)
    if fallback is None:
        return chosen
    log.warning(
        "checkpoint %s %s (its upload to %s did not finish); resuming from %s on the mirror",
        tag,
        why,
        mirror.shown,
        fallback.tag,
    )
    return fallback


def _files_held(tag_dir: str) -> tuple[bool, set[str]]:
    """Whether this node's copy of a checkpoint is complete (its marker valid), and which of the files its
    marker lists are here (a node holds the shards its ranks wrote)."""
    meta = valid_marker(tag_dir)
    if meta is None:
        return False, set()
    return True, {name for name in meta.get("files", {}) if os.path.exists(os.path.join(tag_dir, name))}


def _raise_first(errors: list[str | None]) -> None:
    """Every rank raises the same CheckpointError if any rank found one."""
    first = next((error for error in errors if error), None)
    if first:
        raise CheckpointError(first)


def _on_every_node(
    chosen: CheckpointRef | None, root: str, world: WorldInfo, mirror: CheckpointMirror | None
) -> CheckpointRef | None:
    """Rank 0's choice, present and verified on every node. A node with its own disk fetches it
    from the mirror (after rank 0, so a shared disk is written once); without a mirror every node
    must share the checkpoint directory. Every rank raises if any node lacks it or any file fails."""
    if not several_processes():
        if chosen is not None:
            # Saved by several nodes, this node's copy lacks the others' shards: the mirror's are checked as
            # they arrive.
            verify_files(chosen, allow_missing=mirror is not None)
            if mirror is not None:
                mirror.fill_in(chosen)
        return chosen
    chosen_root, tag, in_own_root = broadcast_object(
        (chosen.root, chosen.tag, os.path.abspath(chosen.root) == os.path.abspath(root))
        if chosen
        else (None, None, False)
    )
    if tag is None:
        return None
    if in_own_root:  # each node's checkpoint directory (its staging copy of a mirror) by its own path
        chosen_root = root
    tag_dir = os.path.join(chosen_root, tag)
    if mirror is not None and world.local_rank == 0 and valid_marker(tag_dir) is None:
        log.warning("downloading checkpoint %s from %s to this node", tag, mirror.shown)
        mirror.download(tag, chosen_root)
    barrier()
    meta = valid_marker(tag_dir)
    held = gather_objects((socket.gethostname(), meta is not None))
    lacking = sorted({host for host, has in held if not has})
    if lacking:
        raise CheckpointError(
            f"checkpoint {tag} chosen by rank 0 is missing from {chosen_root} on host(s) {', '.join(lacking)}; "
            f"a multi-node run needs --checkpoint-dir on a filesystem every node shares, or a URL (s3://...)."
        )
    ref = CheckpointRef(chosen_root, tag, meta)
    error = None
    if world.local_rank == 0:  # one check per node, before any rank opens a file
        try:
            verify_files(ref, allow_missing=mirror is not None)
        except CheckpointError as failure:
            error = str(failure)
    _raise_first(gather_objects(error))
    return ref
