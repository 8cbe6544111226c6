"""Storage at the bottom of the house: URLs, retries, atomic writes, credential redaction.

Both `dsexit.data` (dataset shards, preparation) and `dsexit.train` (checkpoints and their
mirror, run files) reach storage through this module, so the rules are one set:

    URLs        a local path or any fsspec URL (`open_url_fs`); `is_remote`, `local_path`;
                s3:// and gs:// URLs never carry credentials
    retries     which errors are transient (network, timeouts, the S3 client's own) and are
                retried with exponential backoff (`RetryPolicy`), and which no retry heals
    files       a file is replaced whole or not at all (`atomic_write`); temporary names are
                unique across processes, threads and containers (`temporary_name`); the
                sha256 that shard and checkpoint digests compare (`file_sha256`)
    redaction   credentials never reach a message, a log line or a saved config: passwords in
                URLs and values under secret-looking keys are masked (`redact_text`, `redact`)

Credentials reach fsspec through the environment or its own configuration files, never
through a dsexit config; redaction is the second line of defence for anything printed,
logged or written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
import uuid
from typing import Any

import fsspec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- redaction
MASK = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# Whole names or suffixes such as "key", "secret", "aws_secret_access_key", "session_token";
# not "max_tokens" or "mask_token_id".
_SECRET_KEY = re.compile(
    r"(?:^|_)(key|secret|password|passwd|token|credentials?|secret_access_key|session_token)$", re.IGNORECASE
)


def url_secrets(url: str) -> list[str]:
    """The user-info of a URL ("KEY:SECRET" and its parts), which libraries may echo without the scheme."""
    match = _URL_USERINFO.search(url or "")
    if not match:
        return []
    userinfo = match["userinfo"]
    return sorted({userinfo, *(part for part in userinfo.split(":") if len(part) >= 4)}, key=len, reverse=True)


def redact_text(text: str, *urls: str) -> str:
    """Mask URL user-info in `text`; also wherever the user-info of `urls` appears on its own."""
    text = _URL_USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    for secret in (secret for url in urls for secret in url_secrets(url)):
        text = text.replace(secret, MASK)
    return text


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with URL credentials and secret-looking keys masked."""
    if isinstance(value, dict):
        return {
            key: (MASK if isinstance(key, str) and _SECRET_KEY.search(key) and item not in (None, "") else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


# ---------------------------------------------------------------- URLs
class StorageAccessError(ValueError):
    """A URL this machine cannot open, whatever the retries: an unknown protocol, a filesystem
    package that is not installed, no credentials."""


_URL_CREDENTIALS_UNREAD = ("s3", "s3a", "gs", "gcs")  # their filesystems would take KEY:SECRET@ for a bucket name


def is_remote(url: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol not in (None, "file", "local")


def local_path(url: str) -> str:
    """A local path for `file://` URLs and plain paths."""
    protocol, path = fsspec.core.split_protocol(url)
    return path if protocol in ("file", "local") else url


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def open_url_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a local path or any fsspec URL; StorageAccessError when none can open it."""
    protocol = None if "::" in url else fsspec.core.split_protocol(url)[0]  # chained URLs: fsspec checks them
    if protocol and protocol not in fsspec.available_protocols():
        raise StorageAccessError(
            f"{redact_text(url)} has an unknown protocol {protocol!r}; expected a local path or an fsspec URL "
            f"(file://, s3://, gs://, memory://, ...)."
        )
    if protocol in _URL_CREDENTIALS_UNREAD and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise StorageAccessError(
            f"{redact_text(url)} has credentials in it, which {protocol}:// URLs never carry; give them "
            f"through the environment (AWS_ACCESS_KEY_ID, ...), a credentials file or an "
            f"instance role, and the URL without them."
        )
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as error:  # fsspec knows the protocol, but its package is not installed
        raise StorageAccessError(f"cannot open {redact_text(url)}: {error}.") from None


# ---------------------------------------------------------------- retries
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


def access_error(what: str, error: BaseException) -> StorageAccessError:
    """One line for an error of ACCESS_ERRORS."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    hint = (
        " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a credentials file or an instance role)"
        if "Credentials" in type(error).__name__
        else ""
    )
    return StorageAccessError(redact_text(f"cannot read {what}: {text}{hint}."))


class RetryPolicy:
    """Exponential backoff with jitter; counts the retries it made (for tests and benchmarks)."""

    def __init__(self, retries: int = 6, base_delay_s: float = 0.5, max_delay_s: float = 16.0):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}.")
        self.retries, self.base_delay_s, self.max_delay_s = retries, base_delay_s, max_delay_s
        self.retries_made = 0
        self._lock = threading.Lock()

    def call(self, operation, what: str):
        """`operation()`, retried on transient errors; `what` names it in warnings and the final error
        (credentials in it are masked)."""
        what = redact_text(what)
        for attempt in range(self.retries + 1):
            try:
                return operation()
            except ACCESS_ERRORS as error:
                raise access_error(what, error) from None
            except PERMANENT_ERRORS:
                raise
            except TRANSIENT_ERRORS as error:
                if attempt == self.retries:
                    raise OSError(
                        f"Giving up on {what} after {self.retries + 1} attempts: {redact_text(repr(error))}"
                    ) from error
                delay = min(self.base_delay_s * 2**attempt, self.max_delay_s) * (0.5 + random.random() / 2)
                log.warning("retrying %s in %.2fs after %s", what, delay, redact_text(repr(error)))
                with self._lock:
                    self.retries_made += 1
                time.sleep(delay)


def read_bytes(fs, path: str, *, retries: int | RetryPolicy = 3, what: str = "") -> bytes:
    policy = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries)
    return policy.call(lambda: fs.cat_file(path), what or path)


# ---------------------------------------------------------------- files
def file_sha256(path: str) -> str:
    """The sha256 of a local file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: str) -> str:
    """A temporary file beside `path`, unique across processes, threads and calls (pid and thread id
    alone repeat: thread ids are reused, and pids repeat across containers sharing a disk)."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}.part"


def atomic_write(path: str, text: str) -> None:
    """Replace the local file `path` with `text` whole: written beside it, synced, then renamed."""
    temporary = temporary_name(path)
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
