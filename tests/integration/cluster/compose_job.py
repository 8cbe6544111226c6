"""One project of docker/compose.yaml on this machine's engine: start it, watch a service's log,
stop a node with `docker stop`, wait for the nodes, and copy files out of their containers.

Each project gets a network of its own in 10.78.0.0/16 (scripts/setup_docker.sh), a subnet no
other test uses, through an override file beside the test's files; the same file adds the
test's arguments to the nodes' command (the compose file's own arguments come first).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import yaml

from tests.helpers import REPO
from tests.integration.cluster.docker_images import Images

COMPOSE_FILE = REPO / "docker" / "compose.yaml"
NODES = ("node0", "node1")


class ComposeJob:
    def __init__(self, images: Images, project: str, subnet: str, work_dir: Path, env: dict[str, str], *extra_args):
        self.docker, self.project, self.work_dir = images.docker, project, work_dir
        self.env = {**os.environ, "DSEXIT_IMAGE": images.node, "DSEXIT_S3_IMAGE": images.s3, **env}
        work_dir.mkdir(parents=True, exist_ok=True)
        override = work_dir / "override.yaml"
        services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
        command = [_interpolate(part, self.env) for part in services[NODES[0]]["command"]] + list(extra_args)
        override.write_text(
            yaml.safe_dump(
                {
                    "services": {node: {"command": command} for node in NODES},
                    "networks": {"default": {"ipam": {"config": [{"subnet": subnet}]}}},
                }
            )
        )
        self.compose_command = [*self.docker.compose, "-f", str(COMPOSE_FILE), "-f", str(override), "-p", project]

    def compose(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run(
            [*self.compose_command, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"compose {' '.join(args)} exited {result.returncode}:\n{output[-4000:]}"
        return output

    def container(self, service: str) -> str:
        """The service's container (running or exited), by Compose's labels (the same in v1 and v2)."""
        found = self.docker.run(
            "ps",
            "-a",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).stdout.split()
        assert len(found) == 1, f"{self.project}: {len(found)} containers for {service}"
        return found[0]

    def logs(self, service: str) -> str:
        result = self.docker.run("logs", self.container(service))
        text = result.stdout + result.stderr
        (self.work_dir / f"{service}.log").write_text(text)
        return text

    def wait_for_log(self, service: str, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if text in self.logs(service):
                return
            if not self.running(service):
                break
            time.sleep(0.5)
        raise AssertionError(f"{text!r} not in {service}'s log within {seconds:.0f} s:\n{self.logs(service)[-4000:]}")

    def running(self, service: str) -> bool:
        return self.docker.run("inspect", "-f", "{{.State.Running}}", self.container(service)).stdout.strip() == "true"

    def wait_nodes(self, seconds: float) -> dict[str, int]:
        """Each node's exit code, once both have exited."""
        deadline = time.monotonic() + seconds
        codes = {}
        for node in NODES:
            result = self.docker.run(
                "wait", self.container(node), timeout=max(1.0, deadline - time.monotonic())
            )  # raises TimeoutExpired past the deadline
            codes[node] = int(result.stdout.strip())
        return codes

    def stop(self, service: str, grace_s: int) -> None:
        """`docker stop`: SIGTERM to the container's init, SIGKILL after `grace_s`."""
        result = self.docker.run("stop", "-t", str(grace_s), self.container(service), timeout=grace_s + 60)
        assert result.returncode == 0, result.stderr

    def copy_out(self, service: str, path: str, destination: Path) -> Path:
        result = self.docker.run("cp", f"{self.container(service)}:{path}", str(destination))
        assert result.returncode == 0, result.stderr
        return destination

    def down(self) -> None:
        subprocess.run([*self.compose_command, "down", "-v"], env=self.env, capture_output=True, timeout=600)


def _interpolate(value, env: dict[str, str]) -> str:
    """A compose `${VAR:-default}` value as Compose would resolve it."""
    text = str(value)
    if text.startswith("${") and text.endswith("}") and ":-" in text:
        name, default = text[2:-1].split(":-", 1)
        return env.get(name) or default
    return text
