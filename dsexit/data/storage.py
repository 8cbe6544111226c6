"""Object-storage access for datasets: URLs, retries, verified downloads, the shard cache.

This module owns every byte that crosses the network: which errors count as
transient and are retried with exponential backoff, the sha256 check of each
downloaded shard, and the bounded on-disk LRU cache the reader keeps shards in
(one download per shard per node, whichever ranks share its directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future

import fsspec

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20
DEFAULT_CACHE_MAX_BYTES = 8 << 30  # the on-disk shard cache's bound unless a caller sets one


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: network, timeouts, and the S3 client's own error types."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def _access_errors() -> tuple[type[BaseException], ...]:
    """The S3 client's errors that no retry heals: no credentials, a malformed bucket or key."""
    try:
        import botocore.exceptions

        return (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.ParamValidationError,
        )
    except ImportError:
        return ()


TRANSIENT_ERRORS = _transient_errors()
ACCESS_ERRORS = _access_errors()
# A wrong credential or a path that is a directory will not heal by waiting.
PERMANENT_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, *ACCESS_ERRORS)


class ShardCorruptError(RuntimeError):
    """A shard's bytes do not hash to the sha256 that index.json lists for it."""


class StorageAccessError(ValueError):
    """A URL this machine cannot open, whatever the retries: an unknown protocol, a filesystem
    package that is not installed, no credentials."""


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


_URL_CREDENTIALS_UNREAD = ("s3", "s3a", "gs", "gcs")  # their filesystems would take KEY:SECRET@ for a bucket name


def open_url_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a local path or any fsspec URL; StorageAccessError when none can open it."""
    protocol = None if "::" in url else fsspec.core.split_protocol(url)[0]  # chained URLs: fsspec checks them
    if protocol and protocol not in fsspec.available_protocols():
        raise StorageAccessError(
            f"{url} has an unknown protocol {protocol!r}; expected a local path or an fsspec URL "
            f"(file://, s3://, gs://, memory://, ...)."
        )
    if protocol in _URL_CREDENTIALS_UNREAD and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise StorageAccessError(
            f"{url} has credentials in it, which {protocol}:// URLs never carry; give them "
            f"through the environment (AWS_ACCESS_KEY_ID, ...), a credentials file or an "
            f"instance role, and the URL without them."
        )
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as error:  # fsspec knows the protocol, but its package is not installed
        raise StorageAccessError(f"cannot open {url}: {error}.") from None


def access_error(what: str, error: BaseException) -> StorageAccessError:
    """One line for an error of ACCESS_ERRORS."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    hint = (
        " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a credentials file or an instance role)"
        if "Credentials" in type(error).__name__
        else ""
    )
    return StorageAccessError(f"cannot read {what}: {text}{hint}.")


class RetryPolicy:
    """Exponential backoff with jitter; counts the retries it made (for tests and benchmarks)."""

    def __init__(self, retries: int = 6, base_delay_s: float = 0.5, max_delay_s: float = 16.0):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}.")
        self.retries, self.base_delay_s, self.max_delay_s = retries, base_delay_s, max_delay_s
        self.retries_made = 0
        self._lock = threading.Lock()

    def call(self, operation, what: str):
        for attempt in range(self.retries + 1):
            try:
                return operation()
            except ACCESS_ERRORS as error:
                raise access_error(what, error) from None
            except PERMANENT_ERRORS:
                raise
            except TRANSIENT_ERRORS as error:
                if attempt == self.retries:
                    raise OSError(f"Giving up on {what} after {self.retries + 1} attempts: {error!r}") from error
                delay = min(self.base_delay_s * 2**attempt, self.max_delay_s) * (0.5 + random.random() / 2)
                log.warning("retrying %s in %.2fs after %r", what, delay, error)
                with self._lock:
                    self.retries_made += 1
                time.sleep(delay)


def read_bytes(fs, path: str, *, retries: int | RetryPolicy = 3, what: str = "") -> bytes:
    policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries)
    return policy.call(lambda: fs.cat_file(path), what or path)


def _download_hashing(fs, path: str, destination: str) -> str:
    """Copy path to a local file and return the sha256 of what was written."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as source, open(destination, "wb") as target:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
            target.write(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
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


def temporary_name(path: str) -> str:
    """A download's temporary file beside `path`, unique across processes, threads and calls (pid and
    thread id alone repeat: thread ids are reused, and pids repeat across containers sharing a disk)."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}.part"


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
