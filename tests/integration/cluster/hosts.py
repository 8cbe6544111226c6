"""Two hosts on one machine: network namespaces joined by a veth pair, or loopback as a fallback.

    node 0: namespace <prefix>-0, interface eth0, 10.77.0.1/24   (the master: rank 0, the S3 server)
    node 1: namespace <prefix>-1, interface eth0, 10.77.0.2/24

Each node sees only its own interfaces, so the processes on it talk to the other node
over the veth link exactly as across a network; gloo is pointed at eth0 with
GLOO_SOCKET_IFNAME (both namespaces share this machine's hostname, which resolves to
127.0.0.1). The file system is shared, so each node gets its own run directory and
checkpoints travel through the S3 server, as on machines with local disks.

Where namespaces cannot be made (no root, no `ip`), both nodes are this machine's
loopback; `TwoHosts.mode` says which, and every test prints it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"


@dataclass
class Node:
    rank: int
    address: str
    interface: str
    namespace: str | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        """Command prefix that runs a program on this node."""
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def start(
        self, command: list[str], log_path: Path, env: dict[str, str], cwd: str | None = None
    ) -> subprocess.Popen:
        """A process on this node, in its own session so the node's processes can be killed together."""
        log = open(log_path, "ab")
        process = subprocess.Popen(
            self.prefix + command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        log.close()
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        """SIGKILL every process this node started and all their descendants, as when the machine dies:
        the launcher, its ranks, and the workers torchrun's agent starts in sessions of their own."""
        doomed = [pid for process in self.processes for pid in process_tree(process.pid)]
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGSTOP)  # nothing in the tree starts anything more
            except ProcessLookupError:
                pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        self.processes.clear()

    def set_link(self, up: bool) -> None:
        """Cut or restore this node's network (namespaces only)."""
        if self.namespace:
            subprocess.run(
                ["ip", "-n", self.namespace, "link", "set", self.interface, "up" if up else "down"], check=True
            )


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc's children lists)."""
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                frontier.extend(int(child) for child in children.read_text().split())
            except OSError:
                pass
    return tree


class TwoHosts:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.mode = "netns"
        self.reason = ""
        try:
            self._make_namespaces()
        except (OSError, subprocess.CalledProcessError) as error:
            self._remove_namespaces()
            self.mode, self.reason = "loopback", f"network namespaces unavailable ({error})"
            self.nodes = [Node(0, "127.0.0.1", "lo"), Node(1, "127.0.0.1", "lo")]

    def describe(self) -> str:
        if self.mode == "netns":
            return (
                f"MODE netns: two hosts in network namespaces {self.nodes[0].namespace} ({self.nodes[0].address}) "
                f"and {self.nodes[1].namespace} ({self.nodes[1].address}) joined by a veth pair"
            )
        return f"MODE loopback (fallback): both nodes on 127.0.0.1 - {self.reason}"

    def _namespace(self, rank: int) -> str:
        return f"{self.prefix}-{rank}"

    def _make_namespaces(self) -> None:
        if shutil.which("ip") is None or os.geteuid() != 0:
            raise OSError("needs root and iproute2's `ip`")

        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

        self._remove_namespaces()
        veth = [f"{self.prefix[-9:]}v{rank}" for rank in range(2)]  # interface names: at most 15 characters
        for rank in range(2):
            ip("netns", "add", self._namespace(rank))
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        self.nodes = []
        for rank in range(2):
            namespace, address = self._namespace(rank), f"{SUBNET}.{rank + 1}"
            ip("link", "set", veth[rank], "netns", namespace)
            ip("-n", namespace, "link", "set", veth[rank], "name", "eth0")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "link", "set", "eth0", "up")
            self.nodes.append(Node(rank, address, "eth0", namespace))

    def _remove_namespaces(self) -> None:
        for rank in range(2):
            subprocess.run(["ip", "netns", "del", self._namespace(rank)], capture_output=True)

    def close(self) -> None:
        for node in getattr(self, "nodes", []):
            node.kill_all()
        if self.mode == "netns":
            self._remove_namespaces()
