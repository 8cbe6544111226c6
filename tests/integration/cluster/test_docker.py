"""The Docker files: what can be checked without an engine always runs (Dockerfile syntax, every
COPY source exists, compose services and their wiring, the entrypoint's launch command equals
the one docs/cluster.md shows); the image build and the 2-node compose job run where `docker info` succeeds.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

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


def _docker_engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return f"`docker info` failed: {(probe.stderr or probe.stdout).strip().splitlines()[-1:]}"
    return None


def test_docker_build_and_two_node_compose_job(tmp_path):
    reason = _docker_engine()
    if reason:
        print(f"SKIP docker engine test: {reason}")
        pytest.skip(f"no Docker engine here ({reason}); the checks above ran without one")
    compose = ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "-p", f"dsexit-test-{tmp_path.name[-12:]}"]
    env = {**dict(__import__("os").environ), "MAX_STEPS": "4"}
    try:
        result = subprocess.run(
            compose + ["up", "--build", "--abort-on-container-exit", "--exit-code-from", "node0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "step=4/4" in output and "stopping at step 4: finished" in output
        # Up again: both nodes resume from the checkpoint in S3 and stop at once.
        result = subprocess.run(
            compose + ["up", "--abort-on-container-exit", "--exit-code-from", "node0", "node0", "node1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        assert result.returncode == 0 and "at step 4" in result.stdout + result.stderr
    finally:
        subprocess.run(compose + ["down", "-v"], capture_output=True, timeout=600)
