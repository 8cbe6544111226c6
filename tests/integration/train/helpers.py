"""Launching real training processes for the trainer's integration tests (used by conftest and tests).

Every integration test starts `launch/pretrain.py` through a real launcher (deepspeed,
torchrun, mpirun or plain python) on CPU with the gloo backend and electra-tiny, and
asserts behaviour against another run (never timings). Runs that serve several tests
are session fixtures, so the suite pays for each launch once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.servers import executable, free_port

PRETRAIN = str(REPO / "launch" / "pretrain.py")
FAULT_ENTRY = str(Path(__file__).with_name("fault_entry.py"))  # PRETRAIN, killed inside one checkpoint save
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",  # two ranks on a 2-core machine
    # One extensions directory for every launch (torch's own default on a CPU build), so
    # DeepSpeed's shm op compiles once per machine, not once per launch or per test run.
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
    or str(Path.home() / ".cache" / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"),
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # tcmalloc, as the CPU image preloads it (docs/cpu.md): each rank re-executes itself with it under
    # every launcher, which keeps that path under test (test_export.py checks config.json's record).
    "DSEXIT_TCMALLOC": "auto",
}
# electra-tiny, two micro-batches of 8 per rank per step: steps take a fraction of a second; held-out
# evaluations of 64 samples (0.3 s each; the default 512 take 2 s, twice per launch).
TINY = [
    "--model",
    "electra-tiny",
    "--global-batch-size",
    "32",
    "--micro-batch-size",
    "8",
    "--lr",
    "2e-3",
    "--warmup-steps",
    "3",
    "--log-interval",
    "1",
    "--exit-warmup-steps",
    "4",
    "--progress",
    "lines",
    "--eval-samples",
    "64",
]


def command(launcher: str, nproc: int, args: list[str], kill_at_save: int | None = None) -> list[str]:
    """The launcher's command line for the trainer; with `kill_at_save`, for fault_entry.py, whose
    rank 0 SIGKILLs itself while saving that step (shards written, completion marker not)."""
    script = [PRETRAIN] if kill_at_save is None else [FAULT_ENTRY, "--kill-at-save", str(kill_at_save)]
    if launcher == "deepspeed":
        return [executable("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *script, *args]
    if launcher == "torchrun":
        return [
            executable("torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            *script,
            *args,
        ]
    if launcher == "mpirun":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [executable("mpirun"), *root, "-np", str(nproc), "--oversubscribe", sys.executable, *script, *args]
    if launcher == "python":
        return [sys.executable, *script, *args]
    raise ValueError(launcher)


@dataclass
class Launch:
    run_dir: Path
    returncode: int
    output: str
    metrics_text: str = ""  # metrics.jsonl as this launch left it (a later launch may rewrite the file)

    def _records(self, kind: str) -> dict[int, dict]:
        return {
            record["step"]: record
            for record in map(json.loads, self.metrics_text.splitlines())
            if record.get("kind", "train") == kind
        }

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


def start(
    launcher: str,
    run_dir: Path,
    args: list[str],
    *,
    nproc: int = 2,
    env: dict | None = None,
    kill_at_save: int | None = None,
):
    """A launch in its own session (so a test can signal it like a scheduler would)."""
    log_path = _log_path(run_dir)
    handle = open(log_path, "w")
    process = subprocess.Popen(
        command(launcher, nproc, ["--run-dir", str(run_dir), *args], kill_at_save),
        cwd=REPO,
        env={**ENV, **(env or {})},
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process.log_path = log_path
    return process


def finish(process, run_dir: Path, timeout: float = 420) -> Launch:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    metrics_path = run_dir / "metrics.jsonl"
    return Launch(
        run_dir,
        process.returncode,
        Path(process.log_path).read_text(),
        metrics_path.read_text() if metrics_path.exists() else "",
    )


def resumed_at(before: Launch, after: Launch) -> int:
    """The step `after` resumed from, read from metrics.jsonl alone: a resume keeps the records up to
    its step as they were (the same `time` stamps) and writes every later one anew."""
    old, new = before.metrics, after.metrics
    kept = sorted(step for step in new if step in old and new[step] == old[step])
    assert kept == list(range(1, len(kept) + 1)), f"kept records {kept} are not a prefix of the history"
    assert all(
        new[step]["time"] > max(record["time"] for record in old.values()) for step in new if step not in kept
    ), "a record past the resumed step is not new"
    return len(kept)


def launch(
    launcher: str,
    run_dir: Path,
    args: list[str],
    *,
    nproc: int = 2,
    env: dict | None = None,
    timeout: float = 420,
    kill_at_save: int | None = None,
) -> Launch:
    return finish(start(launcher, run_dir, args, nproc=nproc, env=env, kill_at_save=kill_at_save), run_dir, timeout)


def wait_for_step(run_dir: Path, step: int, process, timeout: float = 300) -> int:
    """Block until metrics.jsonl reaches `step`; returns the last step seen."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return json.loads(lines[-1])["step"]
        if process.poll() is not None:
            raise AssertionError(
                f"the run exited ({process.returncode}) before step {step}:\n"
                f"{Path(process.log_path).read_text()[-4000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


ZERO2_ARGS = [
    *TINY,
    "--deepspeed",
    "ds_configs/zero2.json",
    "--max-steps",
    "20",
    "--save-interval",
    "10",
    "--keep-last",
    "3",
]
