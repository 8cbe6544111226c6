"""Fixtures for the data tests: a real S3 server (moto's server mode) on 127.0.0.1 and synthetic datasets.

Synthetic datasets carry each sample's global number in tokens 1 and 2 of its row,
so a test can say exactly which samples a batch holds without trusting the reader.
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

import pytest

from dsexit.data import DEFAULT_DATA_URL
from dsexit.data.tokenizer import TextTokenizer
from dsexit.data.writer import ShardWriter, StagedOutput

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BUCKET = "dsexit-test"
_ID_BASE = 5  # keeps the encoded ids clear of [PAD]=0


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (it lives beside the checkout in ../shared/data)")
    return path


def encode_sample_number(number: int, seq_len: int) -> list[int]:
    row = [101, _ID_BASE + number // 1000, _ID_BASE + number % 1000, 102]
    return row + [0] * (seq_len - len(row))


def decode_sample_numbers(input_ids) -> list[int]:
    return [int(row[1] - _ID_BASE) * 1000 + int(row[2] - _ID_BASE) for row in input_ids]


def write_synthetic_dataset(url: str, num_samples: int, rows_per_shard: int, seq_len: int = 16, storage_options=None):
    """A dataset whose sample n is `[CLS] n//1000 n%1000 [SEP] [PAD]...` (offset by _ID_BASE)."""
    tokenizer = TextTokenizer("wordpiece", os.path.join(DEFAULT_DATA_URL, "vocab.txt"), 30522,
                              {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103})
    row_bytes = seq_len * 2
    with StagedOutput(url, overwrite=True, storage_options=storage_options) as output:
        writer = ShardWriter(output.staging_url, tokenizer, seq_len, rows_per_shard * row_bytes, storage_options)
        writer.add_rows([encode_sample_number(n, seq_len) for n in range(num_samples)])
        return output.publish(writer.finish())


def one_error_line(capsys) -> str:
    """The single `prepare_data: error:` line a CLI call printed to stderr (fails if there are more or none)."""
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("prepare_data: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


class MotoServer:
    """moto_server as a child process; stop() loses all its buckets (moto keeps state in memory)."""

    def __init__(self, port: int, log_dir: Path):
        self.port, self.log_dir = port, log_dir
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def start(self) -> None:
        beside_python = Path(sys.executable).with_name("moto_server")
        executable = str(beside_python) if beside_python.exists() else shutil.which("moto_server")
        if executable is None:  # a test dependency: its absence is a broken setup, not a reason to skip
            raise RuntimeError("moto_server is not installed; run ./scripts/setup.sh (pip install -e '.[test]')")
        log = open(self.log_dir / f"moto-{self.port}.log", "ab")
        env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
        self.process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within 30s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def make_bucket(self) -> str:
        import fsspec

        fs = fsspec.filesystem("s3", **self.storage_options)
        fs.invalidate_cache()
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        return f"s3://{BUCKET}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _dummy_aws_credentials():
    # Only for botocore's signing; moto accepts anything. Never real credentials.
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = MotoServer(_free_port(), tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def restartable_s3(tmp_path):
    """A server of the test's own, so stopping it cannot disturb other tests."""
    server = MotoServer(_free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
