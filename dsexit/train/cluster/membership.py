"""Who was in the job last time, so that a restarted worker can say what changed.

The first rank of every node keeps RUN_DIR/membership.json: the nodes of the world it runs in (host,
address, ranks) and, once it stops, why, at which step and when (its own wall clock, on its own disk, so
a restart on the same node compares like with like). A worker started again (by an elastic agent, or by
a person) reads the record its predecessor on this node left before writing its own; the trainer then
logs one line after resuming (which nodes left or joined, the world size before and after, the step it
resumed from, the steps done again) and one after its first step (how long since the stop).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from dsexit.storage import atomic_write
from dsexit.train.cluster.distributed import WorldInfo, job_nodes

MEMBERSHIP_FILE = "membership.json"


def _node_keys(nodes: dict[str, dict]) -> dict[tuple[str, str], str]:
    """(host, address) -> label: a node keeps its identity across worlds; its label (group rank) may not."""
    return {(node["host"], node["address"]): label for label, node in nodes.items()}


@dataclass(frozen=True)
class WorldChange:
    """The world before this worker's start, as its predecessor on this node recorded it."""

    nodes_before: dict[str, dict]
    nodes_now: dict[str, dict]
    world_size_before: int
    world_size_now: int
    stop_reason: str | None  # "finished", "preempted", "lost peer", ...; None: the predecessor never recorded a stop
    stopped_at_step: int | None
    stopped_at: float | None  # wall clock
    lost: str | None  # the predecessor's sentence naming the lost node

    @property
    def left(self) -> list[str]:
        now = _node_keys(self.nodes_now)
        return [label for key, label in _node_keys(self.nodes_before).items() if key not in now]

    @property
    def joined(self) -> list[str]:
        before = _node_keys(self.nodes_before)
        return [label for key, label in _node_keys(self.nodes_now).items() if key not in before]

    @property
    def changed(self) -> bool:
        return bool(self.left or self.joined or self.lost) or self.world_size_before != self.world_size_now

    def _describe(self, label: str, nodes: dict[str, dict]) -> str:
        node = nodes[label]
        return f"{label} ({node['address']}, host {node['host']})"

    def sentence(self, resumed_step: int) -> str:
        """`node 1 (10.0.0.2, host b) left; world size 2 -> 1; resumed from step 6; 1 step(s) redone ...`"""
        parts = [f"{self._describe(label, self.nodes_before)} left" for label in self.left]
        parts += [f"{self._describe(label, self.nodes_now)} joined" for label in self.joined]
        parts.append(f"world size {self.world_size_before} -> {self.world_size_now}")
        parts.append(f"resumed from step {resumed_step}")
        if self.stopped_at_step is not None:
            redone = max(0, self.stopped_at_step - resumed_step)
            parts.append(f"{redone} step(s) redone (the previous world reached step {self.stopped_at_step})")
        else:
            parts.append("steps redone unknown (the previous worker here recorded no stop)")
        why = f"; it stopped: {self.stop_reason}" if self.stop_reason else ""
        if self.lost:
            why += f" ({self.lost})"
        return "; ".join(parts) + why

    def seconds_since_stop(self) -> float | None:
        return None if self.stopped_at is None else time.time() - self.stopped_at


def _path(run_dir: str) -> str:
    return os.path.join(run_dir, MEMBERSHIP_FILE)


def _read(run_dir: str) -> dict | None:
    try:
        with open(_path(run_dir)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):  # none yet, or one a crash cut short: nothing to compare with
        return None
    return record if isinstance(record, dict) and isinstance(record.get("nodes"), dict) else None


def begin(run_dir: str, world: WorldInfo) -> WorldChange | None:
    """This node's first rank: read the predecessor's record, write this world's. The change (None on
    other ranks, on a first start, or when nothing changed) is for the trainer to report once resumed."""
    if world.local_rank != 0:
        return None
    previous = _read(run_dir)
    os.makedirs(run_dir, exist_ok=True)  # a node joining with an empty disk
    nodes = job_nodes()
    atomic_write(_path(run_dir), json.dumps({"nodes": nodes, "world_size": world.world_size}, indent=1) + "\n")
    if previous is None:
        return None
    stop = previous.get("stop") or {}
    change = WorldChange(
        nodes_before=previous["nodes"],
        nodes_now=nodes,
        world_size_before=int(previous.get("world_size", 0)),
        world_size_now=world.world_size,
        stop_reason=stop.get("reason"),
        stopped_at_step=stop.get("step"),
        stopped_at=stop.get("at"),
        lost=stop.get("lost"),
    )
    return change if change.changed else None


def record_stop(run_dir: str, world: WorldInfo, reason: str, step: int | None, lost: str | None = None) -> None:
    """This node's first rank: why this worker stops, at which step (None: before training began)."""
    if world.local_rank != 0:
        return
    record = _read(run_dir)
    if record is None:
        return
    record["stop"] = {"reason": reason, "step": step, "at": time.time(), "lost": lost}
    atomic_write(_path(run_dir), json.dumps(record, indent=1) + "\n")
