"""A run's checkpoints on their mirror URL: uploads after a save, downloads for a resume, `latest`.

The local copy (RUN_DIR/checkpoints, the staging directory) is complete first; then every
kept checkpoint the mirror lacks is uploaded, oldest first (the new one and any whose upload
failed before): a stale or partial copy there is removed whole, marker first; each rank
uploads the shards it wrote, rank 0 sends again any file lost on the way, and the marker goes
up only over a whole copy, then `latest`. A failed upload is a warning, never a lost local
checkpoint: the next save retries it. The object-store operations themselves are
`store.RemoteMirror`'s; the markers on the mirror are read by `files.RemoteCheckpoints`.
"""

from __future__ import annotations

import json
import logging
import os

from dsexit.storage import RetryPolicy, file_sha256, redact_text
from dsexit.train.checkpoint.files import LATEST, MARKER, CheckpointRef, RemoteCheckpoints, step_of
from dsexit.train.checkpoint.store import file_owner
from dsexit.train.cluster.distributed import WorldInfo, barrier, broadcast_object, gather_objects
from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")


class CheckpointMirror:
    """The mirror of one run's checkpoint directory `root`; every rank holds one."""

    def __init__(self, url: str, root: str, world: WorldInfo, policy: RetryPolicy | None = None):
        self.index = RemoteCheckpoints(url, policy)
        self.remote = self.index.remote
        self.root, self.world = root, world

    @property
    def url(self) -> str:
        return self.remote.url

    @property
    def shown(self) -> str:
        """The URL as messages show it (credentials masked)."""
        return self.remote.shown

    def download(self, tag: str, root: str, names: list[str] | None = None) -> None:
        """The mirror's copy of `tag` into root/tag: all of it, or only `names` (relative to the tag)."""
        try:
            self.remote.download(tag, root, names)
        except OSError as error:
            raise CheckpointError(
                f"could not download checkpoint {tag} from {self.shown}: {redact_text(str(error))}"
            ) from None

    def fill_in(self, ref: CheckpointRef) -> CheckpointRef:
        """`ref` with every file its marker lists in this node's copy. A node with its own disk holds only
        the shards its ranks wrote; the other nodes' come from the mirror (for a Hugging Face export, a
        universal conversion, or a resume in a world of one), each checked against its listed digest
        before anything opens it (CheckpointError naming the first that differs)."""
        listed = ref.meta.get("files", {})
        missing = [name for name in listed if not os.path.exists(os.path.join(ref.path, name))]
        if missing:
            log.info("fetching %d file(s) of checkpoint %s from %s", len(missing), ref.tag, self.shown)
            self.download(ref.tag, ref.root, missing)
        for name in missing:
            if file_sha256(os.path.join(ref.path, name)) != listed[name]["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {name} of {ref.tag} fetched from {self.shown} does not match the digest its "
                    "completion marker lists; it is not opened."
                )
        return ref

    def point_latest(self, tag: str) -> None:
        """Rank 0, after a rollback: the mirror's `latest` names `tag` too (a warning if it cannot)."""
        try:
            self.remote.put_text(LATEST, tag)
        except OSError as error:
            log.warning("could not point %s/%s at %s (%s)", self.shown, LATEST, tag, redact_text(str(error)))

    def upload(self, saved: CheckpointRef, kept: set[str]) -> None:
        """Upload every checkpoint of `kept` (rank 0's; the tags retention keeps here) that the mirror
        lacks, oldest first; `latest` there follows `saved` once it is up. Called on every rank."""
        pending = None
        if self.world.is_main:
            pending = []
            try:
                remote_text = {tag: self.remote.read_text(f"{tag}/{MARKER}") for tag in sorted(kept, key=step_of)}
                for tag, text in remote_text.items():
                    with open(os.path.join(self.root, tag, MARKER)) as handle:
                        if text != handle.read():
                            pending.append(tag)
            except OSError as error:
                self._upload_failed(saved.tag, error)
                pending = []
        for tag in broadcast_object(pending):
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
        error = broadcast_object(error)
        if error is None and os.path.isdir(tag_dir):
            try:
                self.remote.upload_missing(tag_dir, tag, lambda name: file_owner(name) == self.world.rank, (MARKER,))
            except OSError as failure:
                error = redact_text(str(failure))
        errors = gather_objects(error)
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
                log.info("uploaded checkpoint %s to %s", tag, self.shown)
            except OSError as failure:
                self._upload_failed(tag, failure)
        barrier()

    def _upload_failed(self, tag: str, error: BaseException) -> None:
        log.warning(
            "could not upload checkpoint %s to %s (%s); the local copy stays in %s and the next save uploads it",
            tag,
            self.shown,
            redact_text(str(error)),
            self.root,
        )
