"""Preemption under the documented launchers: the trainer saves a checkpoint at the step it stopped,
every process exits, and a clean preemption exits 0.

  * docker stop / Kubernetes, simulated: the Dockerfiles' ENTRYPOINT (tini, then
    docker/entrypoint.sh) as PID 1 of a new PID namespace; SIGTERM to PID 1, SIGKILL 10 s later
    (docker's default stop timeout) - which, as in a container, kills whatever is left;
  * SIGTERM to the whole process group of docker/entrypoint.sh (a scheduler's way): exit 0;
  * SIGTERM to the `deepspeed` runner alone, outside a container: the runner dies (it has no
    handler), the ranks notice their launcher lost its parent, save and exit, and so does
    the launcher.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.helpers import REPO
from tests.helpers.servers import free_port

from .helpers import ENV, TINY, start, wait_for_step

MARKER = "dsexit_checkpoint.json"
DOCKER_STOP_TIMEOUT_S = 10
RUN_ARGS = [
    *TINY,
    "--max-steps",
    "1000",
    "--save-interval",
    "1000",
    "--eval-interval",
    "0",
    "--no-export-hf",
    "--no-tensorboard",
    "--no-csv",
]


def dockerfile_entrypoint() -> list[str]:
    """The images' ENTRYPOINT with the image's working directory mapped to this checkout."""
    entrypoints = set()
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (REPO / "docker" / name).read_text()
        workdir = re.search(r"^WORKDIR (\S+)$", text, re.MULTILINE).group(1)
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE).group(1))
        entrypoints.add(
            tuple(str(REPO) + part[len(workdir) :] if part.startswith(workdir + "/") else part for part in entrypoint)
        )
    assert len(entrypoints) == 1, f"the Dockerfiles' ENTRYPOINTs differ: {entrypoints}"
    return list(entrypoints.pop())


def entrypoint_env(nproc: int = 2) -> dict[str, str]:
    return {
        **ENV,
        "NNODES": "1",
        "NODE_RANK": "0",
        "NPROC_PER_NODE": str(nproc),
        "MASTER_PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}:{ENV.get('PATH', '')}",
    }


def start_logged(command: list[str], run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.out"
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    process.log_path = log_path
    return process


def output_of(process) -> str:
    return Path(process.log_path).read_text(errors="replace")


def assert_checkpointed_at_last_step(run_dir: Path, output: str, cause: str) -> int:
    # Rank 0 names the cause when it noticed it itself; when another rank noticed first, the stop
    # reaches rank 0 as "signal on another rank". Either way the run must save and stop at its last step.
    assert f"preemption requested ({cause}" in output or "preemption requested (signal on another rank" in output, (
        output[-4000:]
    )
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("kind", "train") == "train"
    ]
    last = max(steps)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"global_step{last}", output[-4000:]
    assert (checkpoints / f"global_step{last}" / MARKER).exists()
    assert f"stopping at step {last}: preempted" in output
    return last


def job_processes(session_id: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session_id and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def _pid_namespace_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a new PID namespace"
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    init = dockerfile_entrypoint()[0]
    if not os.access(init, os.X_OK):
        return f"the images' init {init} is not installed here (apt-get install tini; scripts/setup_system.sh)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    return f"unshare --pid failed: {probe.stderr.strip()}" if probe.returncode else None


def test_docker_stop_as_pid_1_saves_and_exits_0(tmp_path):
    reason = _pid_namespace_unavailable()
    assert reason is None, reason  # scripts/setup_system.sh installs what it needs: a missing piece fails
    run_dir = tmp_path / "docker"
    command = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        *dockerfile_entrypoint(),
        "--run-dir",
        str(run_dir),
        *RUN_ARGS,
    ]
    process = start_logged(command, run_dir, entrypoint_env())
    try:
        wait_for_step(run_dir, 3, process)
        pid_1 = psutil.Process(process.pid).children()[0]  # unshare forked it: PID 1 inside the namespace
        assert pid_1.exe() == dockerfile_entrypoint()[0]
        pid_1.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=DOCKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pid_1.kill()  # docker's SIGKILL: the namespace dies with its PID 1
            process.wait(timeout=30)
            raise AssertionError(
                f"still running {DOCKER_STOP_TIMEOUT_S} s after SIGTERM:\n{output_of(process)[-4000:]}"
            ) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, f"exit {code}:\n{output_of(process)[-4000:]}"
    assert_checkpointed_at_last_step(run_dir, output_of(process), "SIGTERM")


def test_process_group_sigterm_to_entrypoint_saves_and_exits_0(tmp_path):
    run_dir = tmp_path / "group"
    entrypoint = str(REPO / "docker" / "entrypoint.sh")
    process = start_logged([entrypoint, "--run-dir", str(run_dir), *RUN_ARGS], run_dir, entrypoint_env())
    try:
        wait_for_step(run_dir, 3, process)
        os.killpg(process.pid, signal.SIGTERM)  # every process of the job: entrypoint, runner, launcher, ranks
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, f"exit {code}:\n{output_of(process)[-4000:]}"
    assert_checkpointed_at_last_step(run_dir, output_of(process), "SIGTERM")
    assert not job_processes(process.pid)


def test_sigterm_to_deepspeed_runner_alone_saves_and_every_process_exits(tmp_path):
    run_dir = tmp_path / "runner"
    process = start("deepspeed", run_dir, [*RUN_ARGS, "--deepspeed", "ds_configs/zero2.json"])
    try:
        wait_for_step(run_dir, 3, process)
        os.kill(process.pid, signal.SIGTERM)  # the runner only: DeepSpeed gives it no handler, it dies
        process.wait(timeout=30)
        deadline = time.monotonic() + 120
        while job_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = job_processes(process.pid)
        assert not left, f"still running after the runner died: {[p.cmdline()[:4] for p in left]}"
    finally:
        if job_processes(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    output = Path(process.log_path).read_text()
    assert_checkpointed_at_last_step(run_dir, output, "the runner")
    assert "done (preempted)" in output


RANK_CODE = """
import sys, time
from dsexit.train.cluster.preemption import PreemptionHandler
handler = PreemptionHandler().install()
print("watching", flush=True)
deadline = time.monotonic() + 30
while not handler.requested and time.monotonic() < deadline:
    time.sleep(0.05)
print("requested:", handler.signal_name, flush=True)
"""
# A process whose command line names deepspeed's per-node launcher, starting one "rank".
LAUNCHER_CODE = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
RUNNER_CODE = (
    "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2], "
    "'deepspeed.launcher.launch'])"
)


def test_launcher_watch_turns_a_lost_runner_into_a_stop_request(tmp_path):
    """Unit level, no training: runner -> 'deepspeed.launcher.launch' -> rank; the runner is SIGKILLed
    and the rank's handler asks for a stop, naming the runner."""
    log = tmp_path / "rank.out"
    with open(log, "w") as out:
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER_CODE, LAUNCHER_CODE, RANK_CODE],
            cwd=REPO,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for(text: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while text not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        return log.read_text()

    try:
        assert "watching" in wait_for("watching", 60), log.read_text()
        runner.kill()
        runner.wait()
        assert f"requested: the runner (pid {runner.pid}) exited" in wait_for("requested:", 30), log.read_text()
    finally:
        for process in job_processes(runner.pid):
            process.kill()
