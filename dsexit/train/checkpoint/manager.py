"""Checkpoints of one run: registered state, save, load, and the calls to resume, mirror and retention.

DeepSpeed writes the shards (`engine.save_checkpoint`); the completion marker is written
after a barrier that follows every rank's save, and `latest` after the marker, both
atomically (files.py describes the layout). A crash mid-save therefore leaves the previous
checkpoint as the one `--resume auto` loads. Rewriting a step (after a rollback or a torn
save) first removes its marker, then its files, so a crash mid-rewrite leaves the step
incomplete rather than a complete marker over half-written files. A full disk is one
CheckpointSpaceError naming the device, and the torn step gives its space back.

Components with state (data position, exit controller, RNG states of every rank, the
trainer's counters) are `Stateful`s registered once (`register`); `save` stores them all in
DeepSpeed's client state and `load` gives each its own back. The resolved run config is
stored once, in the marker. After a save the mirror gets what it lacks (mirror.py) and
retention deletes what it does not keep (retention.py); which checkpoint a start resumes
is resume.py's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any, Protocol

from dsexit.storage import RetryPolicy, atomic_write, is_remote, local_path
from dsexit.train.checkpoint import retention
from dsexit.train.checkpoint.files import LATEST, MARKER, UNIVERSAL_DIR, CheckpointRef, file_digests, tag_for
from dsexit.train.checkpoint.lease import LeaseError, held_lease
from dsexit.train.checkpoint.mirror import CheckpointMirror
from dsexit.train.checkpoint.resume import find_resume
from dsexit.train.checkpoint.signing import load_key, sign
from dsexit.train.checkpoint.store import no_space_message
from dsexit.train.cluster.distributed import WorldInfo, barrier, broadcast_object, gather_objects
from dsexit.train.errors import CheckpointSpaceError

log = logging.getLogger("dsexit")

_LOW_SPACE_BYTES = 64 << 20


STATE_KEY = "dsexit"


class Stateful(Protocol):
    """A component with state a checkpoint carries (data reader, exit controller, RNG, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _is_out_of_space(error: BaseException, root: str) -> bool:
    if getattr(error, "errno", None) == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(root).free < _LOW_SPACE_BYTES
    except OSError:
        return False


class CheckpointManager:
    """Saves, loads and finds checkpoints for one run; every rank holds one."""

    def __init__(
        self,
        location: str,
        staging_dir: str,
        keep_last: int,
        world: WorldInfo,
        run_id: str | None = None,
        policy: RetryPolicy | None = None,
    ):
        self.states: dict[str, Stateful] = {}
        self.root = staging_dir if is_remote(location) else local_path(location)
        self.mirror = CheckpointMirror(location, self.root, world, policy) if is_remote(location) else None
        self.keep_last, self.world = keep_last, world
        self.run_id = run_id
        """This run's id: retention counts only checkpoints whose marker carries it (None: all)."""
        self.lease = held_lease(location) if world.is_main and self.mirror else None
        """Rank 0's lease on a remote checkpoint directory (lease.py): checked before every upload."""
        self.key = load_key()
        """The key that signs every marker this run writes (signing.py); None without one."""

    # ------------------------------------------------------------------ resume
    def find_resume(self, resume: str) -> CheckpointRef | None:
        """The checkpoint `--resume` asks for, present (downloaded from the mirror if need be) and
        verified on every node (its marker signed, with a key); None for a new run (resume.py)."""
        return find_resume(resume, self.root, self.world, self.mirror)

    def whole(self, ref: CheckpointRef) -> CheckpointRef:
        """`ref` with every rank's files in this node's copy. A node with its own disk holds only the
        shards its ranks wrote; the other nodes' come from the mirror (the Hugging Face export of a
        multi-node ZeRO run consolidates them all on rank 0)."""
        return self.mirror.fill_in(ref) if self.mirror else ref

    def point_latest(self, ref: CheckpointRef) -> None:
        """Make `ref` the checkpoint `--resume auto` continues from (a rollback); rank 0."""
        if not self.world.is_main:
            return
        atomic_write(os.path.join(self.root, LATEST), ref.tag)
        if self.mirror:
            self.mirror.point_latest(ref.tag)

    # ------------------------------------------------------------------ registered state
    def register(self, name: str, stateful: Stateful) -> None:
        """Save `stateful` with every checkpoint and restore it in `load`, under `name`, in registration order."""
        if name in self.states:
            raise ValueError(f"state {name!r} is registered twice")
        self.states[name] = stateful

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed stores beside the model: every registered component's state (called on every rank:
        a component's `state_dict` may be a collective)."""
        return {STATE_KEY: {name: stateful.state_dict() for name, stateful in self.states.items()}}

    def load(self, engine, ref: CheckpointRef, load_dir: str) -> None:
        """DeepSpeed loads the model and optimizer; every registered component gets its state back."""
        path, client = engine.load_checkpoint(load_dir, ref.tag)
        if path is None or not client or STATE_KEY not in client:
            raise RuntimeError(f"could not load checkpoint {ref.path} (no trainer state in it).")
        saved = client[STATE_KEY]
        missing = [name for name in self.states if name not in saved]
        if missing:
            raise RuntimeError(
                f"checkpoint {ref.path} has no state for {', '.join(missing)}; it was written by "
                f"another version of dsexit."
            )
        for name, stateful in self.states.items():
            stateful.load_state_dict(saved[name])

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, meta: dict[str, Any]) -> CheckpointRef:
        """Save on every rank; returns once the local checkpoint is complete (marker and `latest`
        written), after trying to mirror it. Raises CheckpointSpaceError when the disk is full."""
        client_state = self.client_state()
        tag = tag_for(step)
        tag_dir = os.path.join(self.root, tag)
        try:
            if self.world.local_rank == 0:
                self._invalidate(tag_dir)
            barrier()
            engine.save_checkpoint(self.root, tag, client_state=client_state, save_latest=False)
            barrier()  # every rank's shards are on disk
            listed = {}
            for part in gather_objects(file_digests(tag_dir) if self.world.local_rank == 0 else {}):
                listed.update(part)
            meta = {**meta, "step": step, "tag": tag, "run_id": self.run_id, "files": listed}
            if self.lease is not None:
                meta["lease_token"] = self.lease.token
            meta = sign(meta, self.key)
            if self.world.is_main:
                self._complete(tag_dir, meta)
        except (OSError, RuntimeError) as error:
            if not _is_out_of_space(error, self.root):
                raise
            if self.world.local_rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete; its space is better given back
            raise CheckpointSpaceError(no_space_message(tag_dir, "checkpoint")) from None
        barrier()
        saved = CheckpointRef(self.root, tag, meta)
        if self.mirror:
            self._check_lease()
            kept = retention.kept_here(self.root, saved, self.keep_last, self.run_id) if self.world.is_main else []
            self.mirror.upload(saved, {ref.tag for ref in kept})
        self.prune(saved)
        return saved

    def _check_lease(self) -> None:
        """Every rank raises the same LeaseError when rank 0's lease was taken over (the fencing check:
        nothing is uploaded to, or deleted from, the store by a trainer that lost it)."""
        error = None
        if self.lease is not None:
            try:
                self.lease.check()
            except LeaseError as lost:
                error = str(lost)
        error = broadcast_object(error)
        if error:
            raise LeaseError(error)

    def _complete(self, tag_dir: str, meta: dict[str, Any]) -> None:
        """Rank 0, once every rank's shards are on disk: the marker, then `latest`."""
        atomic_write(os.path.join(tag_dir, MARKER), json.dumps(meta, indent=1, sort_keys=True))
        atomic_write(os.path.join(self.root, LATEST), meta["tag"])

    def _invalidate(self, tag_dir: str) -> None:
        """Before a step is written again: its marker goes first, then its files."""
        try:
            os.remove(os.path.join(tag_dir, MARKER))
            _fsync_dir(tag_dir)
            log.warning("rewriting checkpoint %s", tag_dir)
        except (FileNotFoundError, NotADirectoryError):
            pass
        shutil.rmtree(tag_dir, ignore_errors=True)
        # a conversion of the old step's files must not stand in for the new ones
        shutil.rmtree(os.path.join(self.root, UNIVERSAL_DIR, os.path.basename(tag_dir)), ignore_errors=True)

    # ------------------------------------------------------------------ retention
    def prune(self, saved: CheckpointRef | None = None) -> None:
        """Delete what retention does not keep, here and on the mirror (retention.py)."""
        retention.prune(self.root, self.world, self.keep_last, self.run_id, saved, self.mirror)


def _fsync_dir(path: str) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
