"""Checkpoints of one run: save, rewrite, resume selection, retention, mirroring.

DeepSpeed writes the shards (`engine.save_checkpoint`); the completion marker is written
after a barrier that follows every rank's save, and `latest` after the marker, both
atomically (files.py describes the layout). A crash mid-save therefore leaves
the previous checkpoint as the one `--resume auto` loads. Rewriting a step (after a
rollback or a torn save) first removes its marker, then its files, so a crash mid-rewrite
leaves the step incomplete rather than a complete marker over half-written files.
Retention counts only this run's checkpoints no newer than the one just saved, and never
removes that one or the one `latest` names; newer steps (an abandoned line after a
rollback) stay until the user removes them.

With a mirror (store.py), the local copy is complete first; then every kept checkpoint
the mirror lacks is uploaded (the new one and any whose upload failed before), each
followed by its marker. A failed upload is a warning, never a lost local checkpoint.
Components with state (data position, exit controller, RNG states of every rank, the
trainer's counters) are `Stateful`s registered once (`register`); `save` stores them all in
DeepSpeed's client state and `load` gives each its own back. The resolved run config is
stored once, in the marker.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
from typing import Any, Protocol

import torch.distributed as dist

from dsexit.storage import RetryPolicy, atomic_write, is_remote, local_path, redact_text
from dsexit.train.checkpoint.files import (
    LATEST,
    MARKER,
    UNIVERSAL_DIR,
    CheckpointError,
    CheckpointRef,
    RemoteCheckpoints,
    complete_checkpoints,
    file_digests,
    open_checkpoint,
    read_latest,
    read_marker,
    resume_choice,
    step_of,
    tag_for,
    valid_marker,
    verify_files,
)
from dsexit.train.checkpoint.store import file_owner, no_space_message
from dsexit.train.distributed import WorldInfo, barrier

log = logging.getLogger("dsexit")

_LOW_SPACE_BYTES = 64 << 20


STATE_KEY = "dsexit"


class Stateful(Protocol):
    """A component with state a checkpoint carries (data reader, exit controller, RNG, counters)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _gather(value: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_first(errors: list[str | None]) -> None:
    """Every rank raises the same CheckpointError if any rank found one."""
    first = next((error for error in errors if error), None)
    if first:
        raise CheckpointError(first)


def _is_out_of_space(error: BaseException, root: str) -> bool:
    if getattr(error, "errno", None) == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(root).free < _LOW_SPACE_BYTES
    except OSError:
        return False


class CheckpointManager:
    """Saves and finds checkpoints for one run; every rank holds one."""

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
        self.remote_index = RemoteCheckpoints(location, policy) if is_remote(location) else None
        self.remote = self.remote_index.remote if self.remote_index else None
        self.root = staging_dir if self.remote else local_path(location)
        self.keep_last, self.world = keep_last, world
        self.run_id = run_id
        """This run's id: retention counts only checkpoints whose marker carries it (None: all)."""

    # ------------------------------------------------------------------ resume
    def find_resume(self, resume: str) -> CheckpointRef | None:
        """The checkpoint `--resume` asks for, present (downloaded from the mirror if need be) and
        verified against its marker on every node; None for a new run."""
        if resume == "none":
            return None
        if resume != "auto":
            return self._on_every_node(open_checkpoint(resume) if self.world.is_main else None)
        local = remote = None
        mirrored: dict[str, Any] = {}
        if self.world.is_main:  # rank 0 chooses; nodes with their own disks may hold other steps
            local = resume_choice(self.root)
            if self.remote_index:
                mirrored = self.remote_index.markers()
                remote = self.remote_index.choice(mirrored)
        local = self._local_only_on_every_node(local, mirrored, remote)
        if self.world.is_main and remote is not None and (local is None or remote.step > local.step):
            log.info("downloading checkpoint %s from %s", remote.tag, self.remote.shown)
            shutil.rmtree(os.path.join(self.root, remote.tag), ignore_errors=True)
            self._download(remote.tag, self.root)
            local = CheckpointRef(self.root, remote.tag, read_marker(os.path.join(self.root, remote.tag)))
        return self._on_every_node(local)

    def _local_only_on_every_node(
        self, local: CheckpointRef | None, mirrored: dict[str, Any], remote: CheckpointRef | None
    ) -> CheckpointRef | None:
        """Rank 0's local choice, unless the mirror lacks it and some node's checkpoint directory does
        too: a save whose upload a lost node cut short is complete on rank 0's disk alone, and the
        other nodes cannot load it. Then the mirror's choice stands (None: rank 0's, which then fails
        in `_on_every_node` naming the hosts that lack it)."""
        if not self.remote or not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        tag = _broadcast(local.tag if self.world.is_main and local is not None and local.tag not in mirrored else None)
        if tag is None:
            return local
        held = _gather(valid_marker(os.path.join(self.root, tag)) is not None if self.world.local_rank == 0 else True)
        if all(held) or not self.world.is_main or remote is None:
            return local
        log.warning(
            "checkpoint %s is complete on this node only (its upload to %s did not finish); "
            "resuming from %s on the mirror",
            tag,
            self.remote.shown,
            remote.tag,
        )
        return None

    def _download(self, tag: str, root: str) -> None:
        try:
            self.remote.download(tag, root)
        except OSError as error:
            raise CheckpointError(
                f"could not download checkpoint {tag} from {self.remote.shown}: {redact_text(str(error))}"
            ) from None

    def _on_every_node(self, chosen: CheckpointRef | None) -> CheckpointRef | None:
        """Rank 0's choice, present and verified on every node. A node with its own disk fetches it
        from the mirror (after rank 0, so a shared disk is written once); without a mirror every node
        must share the checkpoint directory. Every rank raises if any node lacks it or any file fails."""
        single = not dist.is_initialized() or dist.get_world_size() == 1
        if single:
            if chosen is not None:
                verify_files(chosen)
            return chosen
        root, tag, in_own_root = _broadcast(
            (chosen.root, chosen.tag, os.path.abspath(chosen.root) == os.path.abspath(self.root))
            if chosen
            else (None, None, False)
        )
        if tag is None:
            return None
        if in_own_root:  # each node's checkpoint directory (its staging copy of a mirror) by its own path
            root = self.root
        tag_dir = os.path.join(root, tag)
        if self.remote and self.world.local_rank == 0 and valid_marker(tag_dir) is None:
            log.warning("downloading checkpoint %s from %s to this node", tag, self.remote.shown)
            self._download(tag, root)
        barrier()
        meta = valid_marker(tag_dir)
        held = _gather((socket.gethostname(), meta is not None))
        lacking = sorted({host for host, has in held if not has})
        if lacking:
            raise CheckpointError(
                f"checkpoint {tag} chosen by rank 0 is missing from {root} on host(s) {', '.join(lacking)}; "
                f"a multi-node run needs --checkpoint-dir on a filesystem every node shares, or a URL (s3://...)."
            )
        ref = CheckpointRef(root, tag, meta)
        error = None
        if self.world.local_rank == 0:  # one check per node, before any rank opens a file
            try:
                verify_files(ref, allow_missing=bool(self.remote))
            except CheckpointError as failure:
                error = str(failure)
        _raise_first(_gather(error))
        return ref

    def point_latest(self, ref: CheckpointRef) -> None:
        """Make `ref` the checkpoint `--resume auto` continues from (a rollback); rank 0."""
        if not self.world.is_main:
            return
        atomic_write(os.path.join(self.root, LATEST), ref.tag)
        if self.remote:
            try:
                self.remote.put_text(LATEST, ref.tag)
            except OSError as error:
                log.warning(
                    "could not point %s/%s at %s (%s)", self.remote.shown, LATEST, ref.tag, redact_text(str(error))
                )

    # ------------------------------------------------------------------ save
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
        written), after trying to mirror it. Raises CheckpointError when the disk is full."""
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
            for part in _gather(file_digests(tag_dir) if self.world.local_rank == 0 else {}):
                listed.update(part)
            meta = {**meta, "step": step, "tag": tag, "run_id": self.run_id, "files": listed}
            if self.world.is_main:
                self._complete(tag_dir, meta)
        except (OSError, RuntimeError) as error:
            if not _is_out_of_space(error, self.root):
                raise
            if self.world.local_rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete; its space is better given back
            raise CheckpointError(no_space_message(tag_dir, "checkpoint")) from None
        barrier()
        saved = CheckpointRef(self.root, tag, meta)
        if self.remote:
            self.mirror(saved)
        self.prune(saved)
        return saved

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

    # ------------------------------------------------------------------ mirror
    def mirror(self, saved: CheckpointRef) -> None:
        """Upload every kept checkpoint the mirror lacks, oldest first; `latest` there follows the
        newest one uploaded. Failures are warnings: the local copies stay and the next save retries."""
        pending = None
        if self.world.is_main:
            keep = {ref.tag for ref in self._kept_locally(saved)}
            pending = []
            try:
                remote_text = {tag: self.remote.read_text(f"{tag}/{MARKER}") for tag in sorted(keep, key=step_of)}
                for tag, text in remote_text.items():
                    with open(os.path.join(self.root, tag, MARKER)) as handle:
                        if text != handle.read():
                            pending.append(tag)
            except OSError as error:
                self._upload_failed(saved.tag, error)
                pending = []
        for tag in _broadcast(pending):
            self._upload(tag, make_latest=tag == saved.tag)

    def _upload(self, tag: str, make_latest: bool) -> None:
        tag_dir = os.path.join(self.root, tag)
        error = None
        if self.world.is_main:  # a stale or partial copy is replaced whole, marker first
            try:
                self.remote.remove(f"{tag}/{MARKER}")
                self.remote.delete(tag)
            except OSError as failure:
                error = redact_text(str(failure))
        error = _broadcast(error)
        if error is None and os.path.isdir(tag_dir):
            try:
                self.remote.upload_missing(tag_dir, tag, lambda name: file_owner(name) == self.world.rank, (MARKER,))
            except OSError as failure:
                error = redact_text(str(failure))
        errors = _gather(error)
        if self.world.is_main:
            try:
                first = next((failure for failure in errors if failure), None)
                if first:
                    raise OSError(first)
                with open(os.path.join(tag_dir, MARKER)) as handle:
                    marker_text = handle.read()
                # A file lost on the way (the store restarted mid-save) is sent again from here, if
                # this node has it; the marker goes up only over a whole copy.
                self.remote.upload_missing(tag_dir, tag, lambda name: True, (MARKER,))
                held = self.remote.files(tag)
                for relative, expected in json.loads(marker_text)["files"].items():
                    if held.get(relative) != expected["bytes"]:
                        raise OSError(f"{relative} did not arrive")
                self.remote.put_text(f"{tag}/{MARKER}", marker_text)
                if make_latest:
                    self.remote.put_text(LATEST, tag)
                log.info("uploaded checkpoint %s to %s", tag, self.remote.shown)
            except OSError as failure:
                self._upload_failed(tag, failure)
        barrier()

    def _upload_failed(self, tag: str, error: BaseException) -> None:
        log.warning(
            "could not upload checkpoint %s to %s (%s); the local copy stays in %s and the next save uploads it",
            tag,
            self.remote.shown,
            redact_text(str(error)),
            self.root,
        )

    # ------------------------------------------------------------------ retention
    def _ours(self, meta: dict[str, Any]) -> bool:
        return self.run_id is None or meta.get("run_id") == self.run_id

    def _kept(self, complete: dict[str, dict[str, Any]], saved: CheckpointRef, latest: str | None) -> set[str]:
        ours = sorted(
            (meta["step"], tag) for tag, meta in complete.items() if self._ours(meta) and meta["step"] <= saved.step
        )
        return {tag for _, tag in ours[-self.keep_last :]} | {saved.tag} | ({latest} if latest else set())

    def _kept_locally(self, saved: CheckpointRef) -> list[CheckpointRef]:
        complete = {ref.tag: ref.meta for ref in complete_checkpoints(self.root)}
        kept = self._kept(complete, saved, read_latest(self.root))
        return [CheckpointRef(self.root, tag, complete[tag]) for tag in kept if tag in complete]

    def _doomed(
        self, names: list[str], complete: dict[str, dict[str, Any]], kept: set[str], saved: CheckpointRef
    ) -> list[str]:
        """This run's complete checkpoints outside `kept`, and torn saves, no newer than `saved`."""
        doomed = []
        for name in names:
            step = step_of(name)
            if step is None or name in kept or step > saved.step:
                continue
            meta = complete.get(name)
            if (meta is None and step < saved.step) or (meta is not None and self._ours(meta)):
                doomed.append(name)
        return doomed

    def prune(self, saved: CheckpointRef | None = None) -> None:
        """Keep the newest `keep_last` of this run's complete checkpoints no newer than `saved` (here
        and on the mirror), plus `saved` and whatever `latest` names; delete the others and torn
        saves older than `saved`. Newer checkpoints (an abandoned line after a rollback) and other
        runs' checkpoints are left alone. Every node's local rank 0 deletes the same names."""
        doomed_here: list[str] = []
        if self.world.is_main:
            refs = complete_checkpoints(self.root)
            complete = {ref.tag: ref.meta for ref in refs}
            saved = saved or (refs[-1] if refs else None)
            if saved is not None:
                kept = self._kept(complete, saved, read_latest(self.root))
                doomed_here = self._doomed(os.listdir(self.root), complete, kept, saved)
                self._prune_mirror(saved)
        for name in _broadcast(doomed_here):
            if self.world.local_rank == 0:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                shutil.rmtree(os.path.join(self.root, UNIVERSAL_DIR, name), ignore_errors=True)
        universal = os.path.join(self.root, UNIVERSAL_DIR)
        if (
            self.world.local_rank == 0
            and os.path.isdir(universal)
            and not any(step_of(name) is not None for name in os.listdir(universal))
        ):
            shutil.rmtree(universal, ignore_errors=True)  # only DeepSpeed's latest_universal was left
        barrier()

    def _prune_mirror(self, saved: CheckpointRef) -> None:
        if self.remote is None:
            return
        try:
            markers = self.remote_index.markers()
            latest = (self.remote.read_text(LATEST) or "").strip() or None
            kept = self._kept(markers, saved, latest) | {ref.tag for ref in self._kept_locally(saved)}
            for name in self._doomed(self.remote.tags(), markers, kept, saved):
                self.remote.delete(name)
        except OSError as error:
            log.warning(
                "could not prune %s (%s); it is tried again at the next save",
                self.remote.shown,
                redact_text(str(error)),
            )


def _fsync_dir(path: str) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
