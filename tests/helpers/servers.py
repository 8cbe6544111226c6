"""Network helpers for the tests: a free local port and a real S3 endpoint (moto's server mode).

The S3 server is a `moto_server` child process rather than moto's `ThreadedMotoServer` in the
test process, for two reasons: moto keeps buckets in module globals, so threaded servers in one
process would share their buckets and keep them across a restart, while the outage tests need a
restarted server to come back empty; and the cluster tests run the server inside node 0's network
namespace, which only a process started there can listen in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}  # for botocore's signing only; moto accepts anything


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this environment (the venv need not be on PATH)."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else (shutil.which(name) or name)


class S3Server:
    """moto's S3 server as a child process on `host:port`; `stop()` loses every bucket and `start()`
    brings it back, empty, on the same endpoint. `prefix` runs it elsewhere (`ip netns exec NS`)."""

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: list[str] | None = None,
        key_id: str = "testing",
        secret: str = "testing",
    ):
        self.log_dir, self.host, self.prefix = Path(log_dir), host, list(prefix or [])
        self.port = port or free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.key_id, self.secret = key_id, secret
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server through botocore's environment."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
        }

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server (for in-process clients)."""
        return {"key": self.key_id, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def start(self, timeout: float = 30) -> "S3Server":
        program = executable("moto_server")
        if shutil.which(program) is None:  # a test dependency: its absence is a broken setup, not a reason to skip
            raise RuntimeError("moto_server is not installed; run ./scripts/setup.sh (pip install -e '.[test]')")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"moto-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, program, "-H", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"moto_server did not answer on {self.endpoint} within {timeout:.0f} s (log in {self.log_dir})"
                )
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        url = self.endpoint + "/moto-api/"
        if self.prefix:  # only a process in the server's namespace can reach it
            probe = [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1)"]
            return subprocess.run([*self.prefix, *probe], capture_output=True).returncode == 0
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def make_bucket(self, name: str = "dsexit-test") -> str:
        """Create `name` unless it exists; returns its s3:// URL."""
        import fsspec

        fs = fsspec.filesystem("s3", **self.storage_options)
        fs.invalidate_cache()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"
