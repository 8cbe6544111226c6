"""One trainer per remote checkpoint directory: a lease object on the store, written create-only.

A local run directory has an OS file lock (rundir.py); two trainers on different machines can still
share a remote `--checkpoint-dir`, and would overwrite each other's steps and `latest` there. Rank 0
therefore holds a lease before anything is written:

    CHECKPOINT_URL/dsexit.lease   {"job", "holder": {"host", "pid", "started", "proc_start", "nonce"},
                                   "token", "renewed_at", "ttl_s"}

- taken with a create-only write (S3 `If-None-Match: *`), so of two trainers starting at once one
  wins; replaced only with a conditional write on the ETag read (`If-Match`), so of two takeovers
  one wins;
- renewed by a background thread every ttl/4; a lease not renewed for `ttl_s` (DSEXIT_LEASE_TTL_S,
  120 s by default; the reader's clock against the writer's, so hosts' clocks must agree within a
  fraction of it) is stale and may be taken over, and so is one whose holder is a process on this
  same host that no longer runs (a crashed or killed trainer started again at once);
- it belongs to the job, not the process: a holder with the same job id (DSEXIT_JOB_ID, or
  torchrun's `--rdzv-id`, which an elastic agent keeps across restarts of its workers) takes it
  over at once;
- each takeover raises the fencing token; every save first checks that the lease still holds this
  trainer's token (`check`), so a trainer whose lease was taken over stops before it writes or
  deletes anything on the store, and every marker records the token it was written under.

A store without conditional writes (an fsspec filesystem other than S3) gets the same protocol with
plain writes read back, which catches a second trainer unless both start within the same second.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from dsexit.storage import redact_text
from dsexit.train.checkpoint.store import RemoteMirror
from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")

LEASE = "dsexit.lease"
TTL_ENV = "DSEXIT_LEASE_TTL_S"
JOB_ENV = "DSEXIT_JOB_ID"
DEFAULT_TTL_S = 120.0


class LeaseError(CheckpointError):
    """Another trainer holds (or took over) the checkpoint directory's lease."""


def job_id() -> str | None:
    """The job this process belongs to across restarts: DSEXIT_JOB_ID, else torchrun's rendezvous id."""
    for name in (JOB_ENV, "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "")
        if value and value != "none":
            return value
    return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), telling a live holder from a new
    process that reuses its PID; None where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "proc_start": _proc_start(os.getpid()),
        "nonce": uuid.uuid4().hex,  # this acquisition's own, so that our write is told from another's
    }


def _precondition_failed(error: BaseException) -> bool:
    return isinstance(error, FileExistsError) or "pre-condition" in str(error).lower()


class RemoteLease:
    """Rank 0's lease on a remote checkpoint directory (`acquire`, `check`, `release`)."""

    def __init__(self, mirror: RemoteMirror, ttl_s: float | None = None, job: str | None = None):
        self.mirror = mirror
        self.path = f"{mirror.root.rstrip('/')}/{LEASE}"
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S))
        self.job = job if job is not None else job_id()
        protocols = mirror.fs.protocol if isinstance(mirror.fs.protocol, (tuple, list)) else (mirror.fs.protocol,)
        self.conditional = "s3" in protocols  # create-only and If-Match writes
        self.token: int | None = None
        self._lease: dict[str, Any] = {}
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ store operations
    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease, its ETag), or (None, None) when there is none."""
        try:
            self.mirror.fs.invalidate_cache()
            info = self.mirror.fs.info(self.path)
            text = self.mirror.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            lease = json.loads(text)
        except json.JSONDecodeError:
            lease = {"token": 0, "renewed_at": 0, "ttl_s": 0, "holder": {"host": "?", "pid": "?", "started": "?"}}
        return lease, info.get("ETag") or info.get("etag")

    def _write(self, lease: dict[str, Any], etag: str | None) -> bool:
        """Create (`etag` None) or replace the lease conditionally; False when another write won."""
        data = json.dumps(lease, sort_keys=True).encode()
        kwargs: dict[str, Any] = {}
        if self.conditional:
            kwargs = {"mode": "create"} if etag is None else {"IfMatch": etag}
        try:
            out = self.mirror.fs.pipe_file(self.path, data, **kwargs)
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        if self.conditional:
            self.etag = (out or {}).get("ETag") if isinstance(out, dict) else None
            if self.etag is None:
                _, self.etag = self._read()
            return True
        time.sleep(1.0)  # no conditional write: read back after a moment and see whose lease stands
        standing, self.etag = self._read()
        return (
            standing is not None and standing.get("holder") == lease["holder"] and standing["token"] == lease["token"]
        )

    # ------------------------------------------------------------------ the protocol
    def acquire(self) -> None:
        """Take the lease, or raise LeaseError naming its holder."""
        for _ in range(5):  # lost races go round again, reading what won
            current, etag = self.mirror._call(self._read, f"reading {self.mirror.url}/{LEASE}")
            if current is not None and current.get("holder") == self._lease.get("holder"):
                self.token, self.etag, self._lease = current["token"], etag, current  # our write, its reply lost
                self._start_renewing()
                return
            if current is not None:
                why = self._takeover_reason(current)
                if why is None:
                    raise LeaseError(self._held_message(current))
            self._lease = lease = {
                "job": self.job,
                "holder": _holder(),
                "token": int(current.get("token", 0)) + 1 if current else 1,
                "renewed_at": time.time(),
                "ttl_s": self.ttl_s,
            }
            written = self.mirror._call(
                lambda lease=lease, etag=etag if current is not None else None: self._write(lease, etag),
                f"writing {self.mirror.url}/{LEASE}",
            )
            if written:
                if current is not None:
                    log.warning("took over the lease on %s: %s", self.mirror.shown, why)
                self.token = lease["token"]
                self._start_renewing()
                return
        raise LeaseError(f"could not take the lease on {self.mirror.shown}: other trainers kept taking it first.")

    def _takeover_reason(self, current: dict[str, Any]) -> str | None:
        holder = current.get("holder") or {}
        if self.job is not None and current.get("job") == self.job:
            return f"it belongs to this job ({self.job}), restarted"
        age = time.time() - float(current.get("renewed_at", 0))
        if age > float(current.get("ttl_s", self.ttl_s)):
            return f"stale (last renewed {age:.0f} s ago by PID {holder.get('pid')} on host {holder.get('host')})"
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if isinstance(pid, int) and (_proc_start(pid) is None or _proc_start(pid) != holder.get("proc_start")):
                return f"its holder, PID {pid} on this host, no longer runs"
        return None

    def _held_message(self, current: dict[str, Any]) -> str:
        holder = current.get("holder") or {}
        age = time.time() - float(current.get("renewed_at", 0))
        return (
            f"checkpoint_dir={self.mirror.shown!r} is in use by another trainer (PID {holder.get('pid')} on host "
            f"{holder.get('host')}, started {holder.get('started')}; its lease {self.mirror.shown}/{LEASE} was renewed "
            f"{age:.0f} s ago and lapses {float(current.get('ttl_s', self.ttl_s)):.0f} s after its last renewal): two "
            "trainers on one checkpoint directory would overwrite each other's checkpoints; wait for it to end, stop "
            "it, or choose another --checkpoint-dir."
        )

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="dsexit-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                if self.lost is not None:
                    return
                try:
                    lease = {**self._lease, "renewed_at": time.time()}
                    if self._write(lease, self.etag):
                        self._lease = lease
                    else:
                        self.lost = "its lease was replaced by another trainer's"
                except FileNotFoundError:  # gone: the next check writes it again
                    pass
                except Exception as error:  # the store is unreachable: a later renewal tries again
                    log.warning("could not renew the lease on %s (%s)", self.mirror.shown, redact_text(str(error)))

    def _retake(self) -> bool:
        """The lease object is gone (deleted, or a store that lost its objects): written again, create-only,
        with this trainer's token; False when another trainer's write came first."""
        lease = {**self._lease, "renewed_at": time.time()}
        try:
            taken = self._write(lease, None)
        except Exception as error:
            log.warning("could not write the lease on %s again (%s)", self.mirror.shown, redact_text(str(error)))
            return True  # unreachable: the upload that follows fails too, and this is tried again
        if taken:
            self._lease = lease
            log.warning("the lease on %s had gone; this trainer holds it again", self.mirror.shown)
        return taken

    def check(self) -> None:
        """Before anything is written to the store: the lease still holds this trainer's token (the
        fencing check); LeaseError naming the new holder otherwise."""
        with self._lock:
            try:
                current, _ = self._read()
            except Exception as error:  # the store is unreachable: the upload that follows fails and retries later
                log.warning("could not read the lease on %s (%s)", self.mirror.shown, redact_text(str(error)))
                return
            if self.lost is None and current is None and self._retake():
                return
            if self.lost is None and (current is None or current.get("token") != self.token):
                self.lost = "its lease was taken over"
            if self.lost is not None:
                self._stop.set()
                holder = (current or {}).get("holder") or {}
                raise LeaseError(
                    f"this trainer no longer holds {self.mirror.shown}/{LEASE} ({self.lost}: now token "
                    f"{(current or {}).get('token')} of PID {holder.get('pid')} on host {holder.get('host')}, "
                    f"ours was {self.token}); it stops without writing to the checkpoint directory."
                )

    def release(self) -> None:
        """Remove the lease if it is still ours (best effort: a failure leaves it to go stale)."""
        self._stop.set()
        with self._lock:
            if self.token is None or self.lost is not None:
                return
            try:
                current, _ = self._read()
                if current is not None and current.get("token") == self.token:
                    self.mirror.fs.rm_file(self.path)
            except Exception as error:
                log.warning("could not release the lease on %s (%s)", self.mirror.shown, redact_text(str(error)))
            self.token = None


_held: dict[str, RemoteLease] = {}  # checkpoint URL -> the lease this process holds on it


def hold_lease(url: str, mirror: RemoteMirror) -> RemoteLease:
    """Rank 0: the lease on `url`, taken once per process (LeaseError naming the holder)."""
    if url not in _held:
        lease = RemoteLease(mirror)
        lease.acquire()
        _held[url] = lease
    return _held[url]


def held_lease(url: str) -> RemoteLease | None:
    return _held.get(url)


def release_leases() -> None:
    """At the end of the process (a normal end or `_end`): every lease it holds, if still its own."""
    for url in list(_held):
        _held.pop(url).release()
