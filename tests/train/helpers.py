"""Launching real training processes for the trainer's integration tests (used by conftest and tests).

Every integration test starts `launch/pretrain.py` through a real launcher (deepspeed,
torchrun, mpirun or plain python) on CPU with the gloo backend and electra-tiny, and
asserts behaviour against another run (never timings). Runs that serve several tests
are session fixtures, so the suite pays for each launch once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "launch" / "pretrain.py")
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",  # two ranks on a 2-core machine
    # One extensions directory for every launch (torch's own default on a CPU build), so
    # DeepSpeed's shm op compiles once per machine, not once per launch or per test run.
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"),
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# electra-tiny, two micro-batches of 8 per rank per step: steps take a fraction of a second.
TINY = ["--model", "electra-tiny", "--global-batch-size", "32", "--micro-batch-size", "8", "--lr", "2e-3",
        "--warmup-steps", "3", "--log-interval", "1", "--exit-warmup-steps", "4", "--progress", "lines"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this environment (the venv need not be on PATH)."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else (shutil.which(name) or name)


def command(launcher: str, nproc: int, args: list[str]) -> list[str]:
    if launcher == "deepspeed":
        return [executable("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), PRETRAIN, *args]
    if launcher == "torchrun":
        return [executable("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                PRETRAIN, *args]
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [executable("mpirun"), *root, "-np", str(nproc), "--oversubscribe", sys.executable, PRETRAIN, *args]
    if launcher == "python":
        return [sys.executable, PRETRAIN, *args]
    raise ValueError(launcher)


@dataclass
class Launch:
    run_dir: Path
    returncode: int
    output: str

    def _records(self, kind: str) -> dict[int, dict]:
        path = self.run_dir / "metrics.jsonl"
        return {record["step"]: record for record in map(json.loads, path.read_text().splitlines())
                if record.get("kind", "train") == kind}

    @property
    def metrics(self) -> dict[int, dict]:
        """metrics.jsonl training records by step (one per step with --log-interval 1)."""
        return self._records("train")

    @property
    def eval_metrics(self) -> dict[int, dict]:
        """metrics.jsonl held-out evaluation records by step."""
        return self._records("eval")

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def check(self) -> "Launch":
        assert self.returncode == 0, f"launch failed with {self.returncode}:\n{self.output[-6000:]}"
        return self


def _log_path(run_dir: Path) -> Path:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    index = len(list(run_dir.parent.glob(f"{run_dir.name}.launch*.out")))
    return run_dir.parent / f"{run_dir.name}.launch{index}.out"


def start(launcher: str, run_dir: Path, args: list[str], *, nproc: int = 2, env: dict | None = None):
    """A launch in its own session (so a test can signal it like a scheduler would)."""
    log_path = _log_path(run_dir)
    handle = open(log_path, "w")
    process = subprocess.Popen(command(launcher, nproc, ["--run-dir", str(run_dir), *args]), cwd=REPO,
                               env={**ENV, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)
    process.log_path = log_path
    return process


def finish(process, run_dir: Path, timeout: float = 420) -> Launch:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return Launch(run_dir, process.returncode, Path(process.log_path).read_text())


def launch(launcher: str, run_dir: Path, args: list[str], *, nproc: int = 2, env: dict | None = None,
           timeout: float = 420) -> Launch:
    return finish(start(launcher, run_dir, args, nproc=nproc, env=env), run_dir, timeout)


def wait_for_step(run_dir: Path, step: int, process, timeout: float = 300) -> int:
    """Block until metrics.jsonl reaches `step`; returns the last step seen."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return json.loads(lines[-1])["step"]
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before step {step}:\n"
                                 f"{Path(process.log_path).read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


ZERO2_ARGS = [*TINY, "--deepspeed", "ds_configs/zero2.json", "--max-steps", "20", "--save-interval", "10",
              "--keep-last", "3"]


# ---------------------------------------------------------------- object storage
class MotoServer:
    """A real S3 endpoint on 127.0.0.1 (moto's server mode) for checkpoint mirroring."""

    def __init__(self, log_dir: Path):
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.log = open(log_dir / "moto.log", "wb")
        self.process = subprocess.Popen([executable("moto_server"), "-H", "127.0.0.1", "-p", self.endpoint.rsplit(":", 1)[1]],
                                        stdout=self.log, stderr=self.log,
                                        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()
