"""The Docker files: what can be checked without an engine (Dockerfile syntax, every COPY source
exists, compose services and their wiring, the entrypoint's launch command equals the one
docs/cluster.md shows);
then the images built here and the 2-node compose job run for real: stopped on one node with
`docker stop`, it resumes exactly (docker_images.py builds the images; compose_job.py drives Compose).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO
from tests.integration.cluster.compose_job import ComposeJob
from tests.integration.cluster.conftest import reference_digests
from tests.integration.cluster.docker_images import engine_answers, ensure_images

DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "ENTRYPOINT",
    "CMD",
    "LABEL",
    "USER",
    "EXPOSE",
    "VOLUME",
    "SHELL",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
}
RUN_DIR = "/runs/electra"  # the nodes' --run-dir in docker/compose.yaml
GLOBAL_BATCH = 32  # the compose job's (the trainer's default)
TOTAL_STEPS, STOP_AFTER_STEP = 20, 6  # node 1 is stopped once node 0 logged this step: steps are left to run
STOP_GRACE_S = 120  # as the compose file's stop_grace_period
JOB_TIMEOUT_S = 600
CLUSTER_DOCS = {"docs/cluster.md": REPO / "docs" / "cluster.md"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    return instructions


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_parses_and_copies_existing_paths(dockerfile):
    instructions = parse_dockerfile(dockerfile)
    unknown = [keyword for keyword, _ in instructions if keyword not in INSTRUCTIONS]
    assert not unknown, f"{dockerfile.name}: unknown instruction(s) {unknown}"
    first = next(keyword for keyword, _ in instructions if keyword != "ARG")
    assert first == "FROM", f"{dockerfile.name}: the first instruction after ARGs is {first}, not FROM"
    copied = []
    for keyword, arguments in instructions:
        if keyword in ("COPY", "ADD"):
            parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
            assert len(parts) >= 2, f"{dockerfile.name}: {keyword} {arguments} needs a source and a destination"
            for source in parts[:-1]:
                assert (REPO / source).exists(), (
                    f"{dockerfile.name}: {keyword} source {source} is not in the repository"
                )
                copied.append(source)
        if keyword in ("ENTRYPOINT", "CMD") and arguments.startswith("["):
            json.loads(arguments)  # exec form must be a JSON array
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    workdir = dict(instructions)["WORKDIR"]
    # PID 1 is an init that passes docker stop's SIGTERM on (tests/train/test_preemption.py runs it so).
    assert entrypoint[0] == "/usr/bin/tini" and "--" in entrypoint, (
        f"{dockerfile.name}: ENTRYPOINT {entrypoint} has no init"
    )
    assert any(
        keyword == "RUN" and re.search(r"apt-get install [^&]*\btini\b", arguments)
        for keyword, arguments in instructions
    ), f"{dockerfile.name} does not install tini"
    script = entrypoint[entrypoint.index("--") + 1]
    assert script.startswith(workdir + "/") and script.removeprefix(workdir + "/") in {
        target for source in copied for target in (source, f"docker/{Path(source).name}")
    }, entrypoint
    # Everything the entrypoint runs is in the image.
    for needed in ("launch", "ds_configs", "dsexit", "pyproject.toml", "docker/entrypoint.sh", "docker/seed_s3.py"):
        assert any(source == needed for source in copied), f"{dockerfile.name} does not COPY {needed}"


def _default(value: str) -> str:
    """The default of a compose `${VAR:-default}` interpolation (the value itself otherwise)."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match.group(1) if match else str(value)


def test_compose_two_nodes_and_object_store():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"s3", "s3-init", "node0", "node1"}
    nodes = {name: services[name] for name in ("node0", "node1")}
    for name, service in nodes.items():
        assert (DOCKER / service["build"]["context"]).resolve() == REPO
        assert (REPO / _default(service["build"]["dockerfile"])).exists()
        assert service["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
        environment = service["environment"]
        assert environment["NNODES"] == str(len(nodes))
        assert environment["NODE_RANK"] == name.removeprefix("node") and service["hostname"] == name
        assert environment["MASTER_ADDR"] == "node0" and services["node0"]["environment"]["NODE_RANK"] == "0"
        assert environment["AWS_ENDPOINT_URL"].startswith("http://s3:")
        command = service["command"]
        assert command[command.index("--data") + 1] == services["s3-init"]["command"][0]
        assert command[command.index("--checkpoint-dir") + 1].startswith("s3://")
        assert "entrypoint" not in service  # the image's: tini, then docker/entrypoint.sh
        # docker compose stop: SIGTERM, then time for the preemption checkpoint before SIGKILL.
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM" and service["stop_grace_period"]
    assert services["s3-init"]["entrypoint"] == ["python", "docker/seed_s3.py"]
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert environment["AWS_ENDPOINT_URL"].endswith(":" + services["s3"]["environment"]["MOTO_PORT"])


def _entrypoint_launch() -> list[str]:
    """The entrypoint's `exec deepspeed ...` command as tokens; "$@" becomes `...`."""
    text = (DOCKER / "entrypoint.sh").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith("exec deepspeed "))
    tokens = shlex.split(line.replace('"$@"', "...").replace('"', ""))
    return tokens[1:]


def _documented_launch(document: Path) -> list[str]:
    """The `deepspeed ... --no_ssh ...` command in the document's "Run on a cluster" section."""
    assert document.exists(), f"{document} is missing"
    text = document.read_text()
    heading = re.search(r"^(#+) Run on a cluster\s*$", text, re.MULTILINE)
    assert heading, f"{document.name} has no 'Run on a cluster' section"
    level = len(heading.group(1))
    rest = text[heading.end() :]
    following = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    section = (rest[: following.start()] if following else rest).replace("\\\n", " ")
    commands = [
        line.strip() for line in section.splitlines() if line.strip().startswith("deepspeed ") and "--no_ssh" in line
    ]
    assert len(commands) == 1, f"{document.name}: expected one `deepspeed --no_ssh` command, found {commands}"
    return shlex.split(commands[0])


@pytest.mark.parametrize("document", list(CLUSTER_DOCS), ids=list(CLUSTER_DOCS))
def test_entrypoint_launch_command_matches_readme(document):
    assert _documented_launch(CLUSTER_DOCS[document]) == _entrypoint_launch()


def _images():
    """The engine and the images (built here, cached by content: docker_images.py). In CI, and
    wherever this runs as root, a missing piece is installed or built, and its failure fails the
    test; elsewhere a machine without an engine skips it."""
    if os.geteuid() != 0 and not os.environ.get("CI") and not engine_answers():
        pytest.skip("no Docker engine here, and installing one needs root; the checks above ran without one")
    return ensure_images()


def _records(metrics_path: Path, kind: str = "train") -> dict[int, dict]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {record["step"]: record for record in records if record.get("kind", "train") == kind}


def _weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(hf_dir.rglob("*.safetensors"))
    assert files, f"no exported weights in {hf_dir}"
    return {f"{path.relative_to(hf_dir)}:{name}": tensor for path in files for name, tensor in load_file(path).items()}


def _run_out(job: ComposeJob, name: str) -> Path:
    """node 0's run directory's metrics and Hugging Face export, copied out of its container."""
    out = job.work_dir / name
    out.mkdir()
    job.copy_out("node0", f"{RUN_DIR}/metrics.jsonl", out / "metrics.jsonl")
    job.copy_out("node0", f"{RUN_DIR}/hf", out / "hf")
    return out


def test_docker_two_node_zero2_job_stopped_on_one_node_resumes_exactly(tmp_path):
    """The compose job (two nodes, ZeRO-2, data and checkpoints in the S3 service) runs
    uninterrupted; then again, with node 1 stopped by `docker stop` mid-run and brought back as a
    new container (an empty disk), node 0 restarted: the resumed run sees the same samples in every
    step, and ends with the same losses, held-out metrics and weights as the uninterrupted one."""
    images = _images()
    prefix = f"dsexit-test-{os.getpid()}"
    env = {"MAX_STEPS": str(TOTAL_STEPS)}
    args = ("--log-interval", "1", "--eval-samples", "128", "--no-tensorboard", "--no-csv")
    straight = ComposeJob(images, f"{prefix}-straight", "10.78.1.0/24", tmp_path / "straight", env, *args)
    stopped = ComposeJob(images, f"{prefix}-stopped", "10.78.2.0/24", tmp_path / "stopped", env, *args)
    try:
        # 1. The uninterrupted run.
        started = time.monotonic()
        straight.compose("up", "-d")
        assert straight.wait_nodes(JOB_TIMEOUT_S) == {"node0": 0, "node1": 0}, straight.logs("node0")[-5000:]
        log = straight.logs("node0")
        assert '"world_size": 2' in log and '"stage": 2' in log, log[-5000:]
        assert f"stopping at step {TOTAL_STEPS}: finished" in log, log[-5000:]
        reference = _run_out(straight, "run")
        straight.down()
        print(f"uninterrupted compose job: {time.monotonic() - started:.0f} s")

        # 2. The same job; node 1 is stopped mid-run. Its trainer saves a checkpoint (node 0's too,
        # at the same step) and both exit 0 within the grace period.
        started = time.monotonic()
        stopped.compose("up", "-d")
        stopped.wait_for_log("node0", f"step={STOP_AFTER_STEP}/{TOTAL_STEPS}", JOB_TIMEOUT_S)
        stopped.stop("node1", grace_s=STOP_GRACE_S)
        assert stopped.wait_nodes(JOB_TIMEOUT_S) == {"node0": 0, "node1": 0}, stopped.logs("node0")[-5000:]
        first, lost = stopped.logs("node0"), stopped.logs("node1")
        assert "entrypoint.sh: SIGTERM: asking the trainer" in lost, lost[-5000:]
        assert "preemption requested (signal on another rank)" in first, first[-5000:]
        stopped_at = int(re.search(r"stopping at step (\d+): preempted", first).group(1))
        assert STOP_AFTER_STEP <= stopped_at < TOTAL_STEPS, first[-5000:]
        print(f"docker stop node1: both nodes saved at step {stopped_at} and exited 0")

        # 3. Node 1 comes back as a new container (its disk empty: the checkpoint comes from S3),
        # node 0 restarts; both resume at the stopped step and finish.
        stopped.compose("rm", "-f", "node1")
        stopped.compose("up", "-d", "--no-deps", "node0", "node1")
        assert stopped.wait_nodes(JOB_TIMEOUT_S) == {"node0": 0, "node1": 0}, stopped.logs("node0")[-5000:]
        second, returned = stopped.logs("node0"), stopped.logs("node1")
        assert f"resumed from {RUN_DIR}/checkpoints/global_step{stopped_at} at step {stopped_at}" in second
        assert f"downloading checkpoint global_step{stopped_at}" in returned, returned[-5000:]
        assert f"stopping at step {TOTAL_STEPS}: finished" in second, second[-5000:]
        resumed = _run_out(stopped, "run")
        print(f"stopped and resumed compose job: {time.monotonic() - started:.0f} s")
    finally:
        straight.down()
        stopped.down()

    straight_steps, resumed_steps = _records(reference / "metrics.jsonl"), _records(resumed / "metrics.jsonl")
    assert sorted(straight_steps) == sorted(resumed_steps) == list(range(1, TOTAL_STEPS + 1))
    digests = reference_digests(TOTAL_STEPS, global_batch=GLOBAL_BATCH)
    assert [straight_steps[step]["samples_digest"] for step in range(1, TOTAL_STEPS + 1)] == digests
    for step in range(1, TOTAL_STEPS + 1):
        assert resumed_steps[step]["samples_digest"] == digests[step - 1], step
        for name in ("loss", "generator_loss", "discriminator_loss", "rtd_accuracy", "compute_fraction"):
            assert _relative_error(resumed_steps[step][name], straight_steps[step][name]) <= 1e-6, (step, name)
    straight_eval = _records(reference / "metrics.jsonl", "eval")[TOTAL_STEPS]
    resumed_eval = _records(resumed / "metrics.jsonl", "eval")[TOTAL_STEPS]
    for name in ("eval_rtd_loss_uniform", "eval_rtd_loss_generator", "eval_mlm_loss"):
        assert _relative_error(resumed_eval[name], straight_eval[name]) <= 1e-5, name
    # The exported discriminator and generator: bit for bit (one thread per rank, gloo between two).
    straight_weights, resumed_weights = _weights(reference / "hf"), _weights(resumed / "hf")
    assert sorted(straight_weights) == sorted(resumed_weights)
    for name, tensor in straight_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name


def _relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)
