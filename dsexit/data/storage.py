"""Object-storage access for datasets: URLs, retries, verified downloads, the shard cache.

This module owns every byte that crosses the network: which errors count as
transient and are retried with exponential backoff, the sha256 check of each
downloaded shard, and the bounded on-disk LRU cache the reader keeps shards in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import threading
import time
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


TRANSIENT_ERRORS = _transient_errors()
# A wrong credential or a path that is a directory will not heal by waiting.
PERMANENT_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError)


class ShardCorruptError(RuntimeError):
    """A shard's bytes do not hash to the sha256 that index.json lists for it."""


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def open_url_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


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


class ShardCache:
    """Shards on local disk, named by their sha256, evicted least-recently-used by bytes.

    The bound is strict: `max_bytes` must hold the largest shard, and after every
    insert the cache holds at most `max_bytes`. Files already memory-mapped by the
    reader stay readable after eviction (POSIX unlink semantics), so eviction never
    breaks a batch in flight. Safe to use from several threads.
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
        self.downloads = 0
        self._adopt_existing_files()

    def _adopt_existing_files(self) -> None:
        """Count shards an earlier run left in cache_dir, oldest first, so the bound covers them."""
        names = [name for name in os.listdir(self.cache_dir) if name.endswith(".bin") and len(name) == 68]
        names.sort(key=lambda name: os.path.getmtime(os.path.join(self.cache_dir, name)))
        for name in names:
            self._insert(name[:-4], os.path.getsize(os.path.join(self.cache_dir, name)))

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
                self._entries.move_to_end(sha256)
                return self._path(sha256)
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
        path = self._path(sha256)
        if os.path.exists(path) and file_sha256(path) == sha256:
            return path  # left by an earlier reader sharing this cache_dir
        fs, remote_path = open_url_fs(url, self.storage_options)
        temporary = f"{path}.{threading.get_ident()}.part"
        got = None
        for _ in range(2):  # a mismatch is fetched once more before giving up
            got = self.policy.call(lambda: _download_hashing(fs, remote_path, temporary), url)
            self.downloads += 1
            if got == sha256:
                os.replace(temporary, path)
                return path
            log.warning("sha256 mismatch for %s (got %s), fetching again", url, got)
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
