"""Dataset shards on storage: their check before a run, verified downloads, the shard cache.

The sha256 check of each downloaded shard, the check of every shard's presence and size
before a run starts, and the bounded on-disk LRU cache the reader keeps shards in (one
download per shard per node, whichever ranks share its directory). URLs, retries and
temporary names are `dsexit.storage`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future

from dsexit.storage import RetryPolicy, file_sha256, join_url, open_url_fs, temporary_name

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20
DEFAULT_CACHE_MAX_BYTES = 8 << 30  # the on-disk shard cache's bound unless a caller sets one


class ShardCorruptError(RuntimeError):
    """A shard's bytes do not hash to the sha256 that index.json lists for it."""


def _download_hashing(fs, path: str, destination: str) -> str:
    """Copy path to a local file and return the sha256 of what was written."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as source, open(destination, "wb") as target:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


def _remote_sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard_files(
    base_url: str,
    shards: list[tuple[str, int, str]],
    *,
    hash_names=frozenset(),
    storage_options: dict | None = None,
    retries: int = 3,
) -> None:
    """Before a run starts: every (name, num_bytes, sha256) shard is under `base_url` with its size
    (one listing), and the shards in `hash_names` hash to their sha256. Raises ShardCorruptError,
    one line naming the shard and both hashes (a shard of the wrong size is hashed to say so)."""
    policy = RetryPolicy(retries)
    fs, root = open_url_fs(base_url, storage_options)
    listing = policy.call(lambda: fs.ls(root, detail=True), base_url)
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") for entry in listing}
    for name, num_bytes, sha256 in shards:
        url, path = join_url(base_url, name), f"{root.rstrip('/')}/{name}"
        if name not in sizes:
            raise ShardCorruptError(
                f"Shard {url} is missing: index.json lists it with sha256 {sha256} ({num_bytes} bytes)."
            )
        if sizes[name] != num_bytes or name in hash_names:
            got = policy.call(lambda path=path: _remote_sha256(fs, path), url)
            if got != sha256 or sizes[name] != num_bytes:
                raise ShardCorruptError(
                    f"Shard {url} is corrupt: sha256 is {got} ({sizes[name]} bytes), "
                    f"index.json lists {sha256} ({num_bytes} bytes)."
                )


@contextlib.contextmanager
def exclusive_file_lock(path: str):
    """Hold an exclusive flock on `path` (created if absent) for the block: one holder per node, whether
    the others are threads of this process or other processes. The lock files are never deleted, since
    deleting one would let a waiter lock a file that a newcomer no longer sees."""
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ShardCache:
    """Shards on local disk, named by their sha256, evicted least-recently-used by bytes.

    The bound is strict: `max_bytes` must hold the largest shard, and after every
    insert the cache holds at most `max_bytes`. Files already memory-mapped by the
    reader stay readable after eviction (POSIX unlink semantics), so eviction never
    breaks a batch in flight. Safe to use from several threads.

    Node-safe: the ranks of one node share `cache_dir`. A shard is fetched under a
    per-shard file lock (`cache_dir/SHA256.bin.lock`, empty, as MosaicML streaming does),
    so the first rank downloads it and the others wait and reuse the verified file;
    temporary files have unique names. Each rank keeps its own LRU of the shards it
    used; a shard another rank evicted is fetched again when this rank next asks for
    it. `cache_dir` must be on a filesystem with working flock (local disk, tmpfs).
    """

    def __init__(self, cache_dir: str | None, max_bytes: int, policy: RetryPolicy, storage_options: dict | None = None):
        self._own_dir = tempfile.TemporaryDirectory(prefix="dsexit-shards-") if cache_dir is None else None
        self.cache_dir = self._own_dir.name if self._own_dir else cache_dir
        os.makedirs(self.cache_dir, exist_ok=True)
        self.max_bytes = max_bytes
        self.policy = policy
        self.storage_options = storage_options
        self._entries: OrderedDict[str, int] = OrderedDict()  # sha256 -> bytes, oldest first
        self._in_flight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.downloads = 0  # fetched from the remote by this process (a shard another rank fetched is reused)
        self._adopt_existing_files()

    def _adopt_existing_files(self) -> None:
        """Count shards an earlier run left in cache_dir, oldest first, so the bound covers them."""
        found = []
        for name in os.listdir(self.cache_dir):
            if name.endswith(".bin") and len(name) == 68:
                with contextlib.suppress(FileNotFoundError):  # another rank may be evicting it right now
                    stat = os.stat(os.path.join(self.cache_dir, name))
                    found.append((stat.st_mtime, name, stat.st_size))
        for _, name, size in sorted(found):
            self._insert(name[:-4], size)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _path(self, sha256: str) -> str:
        return os.path.join(self.cache_dir, f"{sha256}.bin")

    def get(self, url: str, sha256: str, num_bytes: int) -> str:
        """Local path of the verified shard; downloads it (once, even if asked from two threads)."""
        if num_bytes > self.max_bytes:
            raise ValueError(f"cache_max_bytes={self.max_bytes} cannot hold shard {url} of {num_bytes} bytes.")
        with self._lock:
            if sha256 in self._entries:
                if os.path.exists(self._path(sha256)):
                    self._entries.move_to_end(sha256)
                    return self._path(sha256)
                del self._entries[sha256]  # another rank sharing cache_dir evicted it
            future = self._in_flight.get(sha256)
            owner = future is None
            if owner:
                future = self._in_flight[sha256] = Future()
        if not owner:
            return future.result()
        try:
            path = self._reuse_or_download(url, sha256)
            self._insert(sha256, num_bytes)
            future.set_result(path)
            return path
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            with self._lock:
                self._in_flight.pop(sha256, None)

    def _reuse_or_download(self, url: str, sha256: str) -> str:
        with exclusive_file_lock(f"{self._path(sha256)}.lock"):
            path = self._path(sha256)
            if os.path.exists(path) and file_sha256(path) == sha256:
                return path  # fetched by another rank sharing cache_dir, or left by an earlier run
            return self._download(url, sha256, path)

    def _download(self, url: str, sha256: str, path: str) -> str:
        fs, remote_path = open_url_fs(url, self.storage_options)
        temporary = temporary_name(path)
        got = None
        try:
            for _ in range(2):  # a mismatch is fetched once more before giving up
                got = self.policy.call(lambda: _download_hashing(fs, remote_path, temporary), url)
                self.downloads += 1
                if got == sha256:
                    os.replace(temporary, path)
                    return path
                log.warning("sha256 mismatch for %s (got %s), fetching again", url, got)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise ShardCorruptError(f"Shard {url} is corrupt: sha256 is {got}, index.json lists {sha256}.")

    def _insert(self, sha256: str, num_bytes: int) -> None:
        with self._lock:
            self._entries[sha256] = num_bytes
            self._entries.move_to_end(sha256)
            total = sum(self._entries.values())
            while total > self.max_bytes:
                oldest, size = next(iter(self._entries.items()))
                del self._entries[oldest]
                total -= size
                try:
                    os.unlink(self._path(oldest))
                except FileNotFoundError:
                    pass
