"""Checkpoints: save, completeness, resume selection, retention, mirroring.

Layout of a checkpoint root (RUN_DIR/checkpoints, or the local staging copy of a URL):

    latest                         tag of the newest complete checkpoint (written last)
    global_step100/                DeepSpeed's sharded files for step 100, plus
        dsexit_checkpoint.json     the completion marker: step, world size, ZeRO stage,
                                   resolved config (written after every rank's shards)
    universal/global_step100/      a universal conversion, made when resuming at
                                   another data-parallel size (see universal.py)

A checkpoint is complete when its marker exists; the marker is written after a barrier
that follows every rank's `save_checkpoint`, and `latest` after the marker, both
atomically. A crash mid-save therefore leaves the previous checkpoint as the newest
complete one, which is what `--resume auto` loads. The trainer's own state (data
position, exit controller, RNG states of every rank, config) travels in DeepSpeed's
client state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dsexit.train.distributed import WorldInfo, barrier
from dsexit.train.store import RemoteMirror, is_remote, local_path

log = logging.getLogger("dsexit")

TAG_PREFIX = "global_step"
MARKER = "dsexit_checkpoint.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"
_TAG = re.compile(rf"^{TAG_PREFIX}(\d+)$")
FAULT_ENV = "DSEXIT_FAULT_KILL_DURING_SAVE"
"""Test hook: the step at which rank 0 kills itself after writing its shards, before the marker."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def atomic_write(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class CheckpointRef:
    root: str
    tag: str
    meta: dict[str, Any]

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_marker(tag_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(tag_dir, MARKER)) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def complete_checkpoints(root: str) -> list[CheckpointRef]:
    """Complete checkpoints under a root, oldest first."""
    if not os.path.isdir(root):
        return []
    refs = []
    for name in os.listdir(root):
        if _TAG.match(name) and (meta := read_marker(os.path.join(root, name))) is not None:
            refs.append(CheckpointRef(root, name, meta))
    return sorted(refs, key=lambda ref: ref.step)


def newest_complete(root: str) -> CheckpointRef | None:
    refs = complete_checkpoints(root)
    return refs[-1] if refs else None


def open_checkpoint(path: str) -> CheckpointRef:
    """A checkpoint given by the user: a tag directory, or a root (its newest complete tag)."""
    path = local_path(path).rstrip("/")
    meta = read_marker(path)
    if meta is not None:
        return CheckpointRef(os.path.dirname(path) or ".", os.path.basename(path), meta)
    ref = newest_complete(path)
    if ref is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no {MARKER}) nor a directory holding one.")
    return ref


class CheckpointManager:
    """Saves and finds checkpoints for one run; every rank holds one."""

    def __init__(self, location: str, staging_dir: str, keep_last: int, world: WorldInfo):
        self.remote = RemoteMirror(location) if is_remote(location) else None
        self.root = staging_dir if self.remote else local_path(location)
        self.keep_last, self.world = keep_last, world

    # ------------------------------------------------------------------ resume
    def find_resume(self, resume: str) -> CheckpointRef | None:
        """The checkpoint `--resume` asks for (downloaded from the mirror if need be), or None."""
        if resume == "none":
            return None
        if resume != "auto":
            return open_checkpoint(resume)
        local = None
        if self.world.is_main:  # rank 0 chooses; nodes with their own disks may hold other steps
            local = newest_complete(self.root)
            remote_step, remote_tag = self._newest_remote()
            if remote_tag is not None and (local is None or remote_step > local.step):
                log.info("downloading checkpoint %s from %s", remote_tag, self.remote.url)
                self.remote.download(remote_tag, self.root)
                local = newest_complete(self.root)
        return self._on_every_node(local)

    def _on_every_node(self, chosen: CheckpointRef | None) -> CheckpointRef | None:
        """Rank 0's choice, present on every node. A node with its own disk fetches it from the
        mirror (after rank 0, so a shared disk is written once); without a mirror every node
        must share the checkpoint directory. Every rank raises if any node still lacks it."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return chosen
        choice = [chosen.tag if chosen else None]
        dist.broadcast_object_list(choice, src=0)
        tag = choice[0]
        if tag is None:
            return None
        tag_dir = os.path.join(self.root, tag)
        if self.remote and self.world.local_rank == 0 and read_marker(tag_dir) is None:
            log.warning("downloading checkpoint %s from %s to this node", tag, self.remote.url)
            self.remote.download(tag, self.root)
        barrier()
        held: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(held, (socket.gethostname(), read_marker(tag_dir) is not None))
        lacking = sorted({host for host, has in held if not has})
        if lacking:
            raise FileNotFoundError(
                f"checkpoint {tag} chosen by rank 0 is missing from {self.root} on host(s) {', '.join(lacking)}; "
                f"a multi-node run needs --checkpoint-dir on a filesystem every node shares, or a URL (s3://...).")
        return CheckpointRef(self.root, tag, read_marker(tag_dir))

    def _remote_complete(self) -> dict[str, int]:
        """{tag: step} of the complete checkpoints on the mirror."""
        if self.remote is None:
            return {}
        complete = {}
        for tag in self.remote.tags():
            if _TAG.match(tag) and (text := self.remote.read_text(f"{tag}/{MARKER}")) is not None:
                complete[tag] = int(json.loads(text)["step"])
        return complete

    def _newest_remote(self) -> tuple[int, str | None]:
        complete = self._remote_complete()
        if not complete:
            return -1, None
        tag = max(complete, key=complete.get)
        return complete[tag], tag

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> CheckpointRef:
        """Save on every rank; returns once the checkpoint is complete (marker and `latest` written)."""
        tag = tag_for(step)
        engine.save_checkpoint(self.root, tag, client_state=client_state, save_latest=False)
        if os.environ.get(FAULT_ENV) == str(step) and self.world.is_main:
            os.kill(os.getpid(), 9)
        barrier()  # every rank's shards are on disk
        tag_dir = os.path.join(self.root, tag)
        if self.remote:
            self.remote.upload_shards(tag_dir, tag, self.world.rank, skip=(MARKER,))
            barrier()
        meta = {**meta, "step": step, "tag": tag}
        if self.world.is_main:
            marker_text = json.dumps(meta, indent=1, sort_keys=True)
            atomic_write(os.path.join(tag_dir, MARKER), marker_text)
            atomic_write(os.path.join(self.root, LATEST), tag)
            if self.remote:
                self.remote.put_text(f"{tag}/{MARKER}", marker_text)
                self.remote.put_text(LATEST, tag)
            self.prune()
        barrier()
        if self.remote and self.world.local_rank == 0 and not self.world.is_main:
            self.prune(on_mirror=False)  # this node's staging copies (a node without rank 0 has no markers)
        return CheckpointRef(self.root, tag, meta)

    def prune(self, on_mirror: bool = True) -> None:
        """Keep the newest `keep_last` complete checkpoints (here and on the mirror); delete older
        ones, complete or not. Anything newer than the newest complete one is left alone."""
        remote = self._remote_complete()
        steps = sorted({ref.step for ref in complete_checkpoints(self.root)} | set(remote.values()))
        if not steps:
            return
        keep, newest = set(steps[-self.keep_last:]), steps[-1]

        def doomed(name: str) -> bool:
            match = _TAG.match(name)
            return bool(match) and int(match.group(1)) not in keep and int(match.group(1)) < newest

        for name in filter(doomed, os.listdir(self.root)):
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            shutil.rmtree(os.path.join(self.root, UNIVERSAL_DIR, name), ignore_errors=True)
        universal = os.path.join(self.root, UNIVERSAL_DIR)
        if os.path.isdir(universal) and not any(_TAG.match(name) for name in os.listdir(universal)):
            shutil.rmtree(universal, ignore_errors=True)  # only DeepSpeed's latest_universal was left
        if self.remote and on_mirror:
            for name in filter(doomed, self.remote.tags()):
                self.remote.delete(name)
