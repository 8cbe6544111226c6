"""Where checkpoints live: the mirror on any fsspec URL (s3://, gs://, memory://, ...), and
the write probe every location passes before step 1.

DeepSpeed writes checkpoints to local files; when the checkpoint location is a URL,
the trainer stages them in RUN_DIR/checkpoints and this module copies them out: each
rank uploads the shards it wrote (only those the mirror lacks), then rank 0 uploads the
completion marker and `latest`, in that order, so a reader of the bucket sees a
checkpoint only once it is whole. Every object-store operation goes through
`dsexit.storage.RetryPolicy`, as the data reader's do (backoff, bounded). Credentials are never handled here: fsspec
finds them in the environment or its usual configuration files; URLs in messages are
redacted.
"""

from __future__ import annotations

import errno
import os
import re
import uuid

from dsexit.storage import RetryPolicy, open_url_fs, redact_text

_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")
PROBE_PREFIX = ".dsexit-write-probe-"


class StorageError(OSError):
    """A location the run must write cannot be written; one sentence naming it."""


def file_owner(name: str) -> int:
    """The data-parallel rank that wrote a DeepSpeed checkpoint file (rank 0 for shared files)."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


def mount_of(path: str) -> str:
    """'DEVICE (mounted at MOUNTPOINT)' for the filesystem holding `path`, for messages."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    best = ("", "")
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                device, mountpoint = line.split()[:2]
                inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
                if inside and len(mountpoint) >= len(best[1]):
                    best = (device, mountpoint)
    except OSError:
        pass
    return f"{best[0]} (mounted at {best[1]})" if best[1] else path


def _describe(error: BaseException) -> str:
    reasons = {
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a path component is a file, not a directory",
        errno.EEXIST: "it exists and is not a directory",
        errno.ENOSPC: "no space left on the device",
    }
    return reasons.get(getattr(error, "errno", None), f"{type(error).__name__}: {error}")


def probe_local_dir(path: str, what: str) -> None:
    """Write, read back and remove a small file in `path`; directories the probe had to create are
    removed again, so a probe leaves no trace."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{what} {redact_text(path)!r} is a file; expected a directory.")
    path = os.path.abspath(path)
    created = []
    parent = path
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        created.append(parent)
        parent = os.path.dirname(parent)
    probe = os.path.join(path, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        for attempt in range(5):
            try:
                os.makedirs(path, exist_ok=True)
                with open(probe, "wb") as handle:
                    handle.write(b"dsexit")
                    handle.flush()
                    os.fsync(handle.fileno())
                break
            except FileNotFoundError:
                # Nodes probe one shared directory at once, and each removes the directories it
                # created: another node's clean-up came between two mkdirs, or between mkdir and open.
                if attempt == 4:
                    raise
        os.remove(probe)
    except OSError as error:
        raise StorageError(
            f"{what} {redact_text(path)!r} is not writable ({_describe(error)}); "
            f"expected a directory this run can write."
        ) from None
    finally:
        for directory in created:  # deepest first
            try:
                os.rmdir(directory)
            except OSError:
                break


def no_space_message(path: str, what: str) -> str:
    return (
        f"no space left on {mount_of(path)} while writing {what} {redact_text(path)}; free space there or "
        f"choose another --checkpoint-dir."
    )


class RemoteMirror:
    def __init__(self, url: str, policy: RetryPolicy | None = None):
        self.url = url.rstrip("/")
        self.shown = redact_text(self.url)
        self.fs, self.root = open_url_fs(self.url)
        self.policy = policy or RetryPolicy()

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _call(self, operation, what: str):
        try:
            return self.policy.call(operation, redact_text(what))
        except (OSError, ValueError) as error:  # ValueError: the reader's StorageAccessError (no credentials, ...)
            # one type for callers, and the store's own messages may echo the URL's user-info
            raise OSError(self.redact(str(error))) from None

    def redact(self, text: str) -> str:
        return redact_text(text, self.url)

    def probe(self) -> None:
        """Write, read back and remove a small object under the mirror's root."""
        path = self._remote(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            self._call(lambda: self.fs.pipe_file(path, b"dsexit"), f"a write probe to {self.url}")
            self._call(lambda: self.fs.rm_file(path), f"removing the write probe from {self.url}")
        except OSError as error:
            raise StorageError(
                f"checkpoint_dir={self.shown!r} is not writable ({redact_text(str(error))}); "
                f"expected a location this run can write (bucket, credentials, endpoint)."
            ) from None

    def files(self, tag: str) -> dict[str, int]:
        """{path relative to the tag: size} of what the mirror holds for `tag`."""
        base = self._remote(tag)

        def listing():
            try:
                self.fs.invalidate_cache()
                return self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}

        found = self._call(listing, f"listing {self.url}/{tag}")
        return {path[len(base) :].lstrip("/"): int(info.get("size") or 0) for path, info in found.items()}

    def upload_missing(self, local_tag_dir: str, tag: str, owned, skip: tuple[str, ...]) -> int:
        """Upload the files of a tag that `owned(name)` selects and the mirror lacks (or holds at
        another size); markers excluded. Returns how many were uploaded."""
        held = self.files(tag)
        uploaded = 0
        for dirpath, _, names in os.walk(local_tag_dir):
            for name in names:
                local = os.path.join(dirpath, name)
                relative = os.path.relpath(local, local_tag_dir).replace(os.sep, "/")
                if name in skip or not owned(name) or held.get(relative) == os.path.getsize(local):
                    continue
                remote = self._remote(tag, *relative.split("/"))
                self._call(
                    lambda local=local, remote=remote: self.fs.put_file(local, remote),
                    f"uploading {relative} to {self.url}/{tag}",
                )
                uploaded += 1
        return uploaded

    def put_text(self, relative: str, text: str) -> None:
        path = self._remote(relative)
        self._call(lambda: self.fs.pipe_file(path, text.encode()), f"writing {self.url}/{relative}")

    def read_text(self, relative: str) -> str | None:
        path = self._remote(relative)

        def read():
            try:
                return self.fs.cat_file(path).decode("utf-8", errors="replace")
            except FileNotFoundError:
                return None

        return self._call(read, f"reading {self.url}/{relative}")

    def remove(self, relative: str) -> None:
        path = self._remote(relative)

        def remove():
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._call(remove, f"removing {self.url}/{relative}")

    def tags(self) -> list[str]:
        def listing():
            try:
                self.fs.invalidate_cache()
                return self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []

        entries = self._call(listing, f"listing {self.url}")
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    def download(self, tag: str, local_root: str, names: list[str] | None = None) -> str:
        """The mirror's copy of `tag` into local_root/tag: all of it, or only `names` (relative to the tag)."""
        target = os.path.join(local_root, tag)
        os.makedirs(target, exist_ok=True)
        if names is None:
            self._call(
                lambda: self.fs.get(self._remote(tag) + "/", target + "/", recursive=True),
                f"downloading {self.url}/{tag}",
            )
        for name in names or ():
            local = os.path.join(target, *name.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self._call(
                lambda name=name, local=local: self.fs.get(self._remote(tag, name), local),
                f"downloading {self.url}/{tag}/{name}",
            )
        return target

    def move(self, tag: str, relative: str) -> None:
        """`tag`'s objects to `relative`/`tag`: copied first, then the originals deleted, so an interruption
        leaves the checkpoint in one place or both (an object store has no rename)."""
        source, target = self._remote(tag), self._remote(relative, tag)
        self._call(lambda: self.fs.copy(source + "/", target + "/", recursive=True), f"copying {self.url}/{tag}")
        self.delete(tag)

    def delete(self, tag: str) -> None:
        path = self._remote(tag)

        def delete():
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        self._call(delete, f"deleting {self.url}/{tag}")
