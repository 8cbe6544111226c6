"""Elastic jobs on two hosts (torchrun's agent through docker/entrypoint.sh with NNODES=1:2, the
rendezvous store on host A): a lost node costs no command, and a returning one is taken back.

1. Host A starts alone (world size 1); host B joins: the job grows to world size 2, the workers on A
   save and resume with no step redone. Then every process of host B is killed: A's workers fail
   (a closed connection), its agent re-forms the job alone, and A finishes at world size 1.
2. Both hosts start; host B's network goes down with nothing killed (no connection closes): A's
   heartbeat finds B silent, and A finishes at world size 1.
3. Both hosts start; host B is preempted (SIGTERM to its entrypoint, as `docker stop` sends): every
   rank saves at the same step, B's node leaves, and A goes on at world size 1 with no step redone.

Each time the samples of every step, before and after each change, are exactly those of the data
order (an uninterrupted run's), and A's log says which node left or joined, the step it resumed
from and the steps redone. The time from the loss to the first new step is printed.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.cluster.conftest import (
    launch_elastic_node,
    metrics,
    read_log,
    reference_digests,
    wait_all,
)

TOTAL_STEPS, SAVE_INTERVAL = 40, 2
HEARTBEAT_TIMEOUT_S = 10
JOB_TIMEOUT_S = 420


def _args(tmp_path: Path, job: str) -> tuple[str, ...]:
    return (
        "--deepspeed",
        "ds_configs/zero2.json",
        "--save-interval",
        str(SAVE_INTERVAL),
        "--max-steps",
        str(TOTAL_STEPS),
        "--heartbeat-timeout",
        str(HEARTBEAT_TIMEOUT_S),
        "--checkpoint-dir",
        f"s3://dsexit-cluster/{job}/checkpoints",
    )


def _wait_for(path: Path, pattern: str, processes, seconds: float = 240, start: int = 0) -> tuple[re.Match, int]:
    """The first match of `pattern` in the log past character `start`, and where it ends."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        match = re.compile(pattern).search(read_log(path), start)
        if match:
            return match, match.end()
        if all(process.poll() is not None for process in processes):
            break
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path.name} within {seconds:.0f} s:\n{read_log(path)[-6000:]}")


def _change(log: str, start: int = 0) -> re.Match:
    """The trainer's line after an elastic restart (`Trainer`: "the job changed: ...")."""
    pattern = (
        r"the job changed: (?P<what>.*?)world size (?P<before>\d+) -> (?P<after>\d+); "
        r"resumed from step (?P<resumed>\d+); (?P<redone>\d+) step\(s\) redone "
        r"\(the previous world reached step (?P<reached>\d+)\); it stopped: (?P<why>.*)"
    )
    match = re.compile(pattern).search(log, start)
    assert match, log[start:][-6000:]
    return match


def _assert_exact_history(run_dir: Path) -> None:
    """A's metrics.jsonl (rank 0 was on A in every world) holds one record per step, each step's
    samples those of the data order: none lost or repeated across the changes."""
    records = metrics(run_dir)
    assert [record["step"] for record in records] == list(range(1, TOTAL_STEPS + 1))
    assert [record["samples_digest"] for record in records] == reference_digests(TOTAL_STEPS)


def _start_both(hosts, s3, tmp_path: Path, job: str, port: int):
    """Both hosts start an elastic job together; returns their processes, logs and run directories and
    where host A's log has reached a step in the world of two (if B came later than the rendezvous' last
    call, A grew to it)."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    run_dirs = [tmp_path / "a", tmp_path / "b"]
    args = _args(tmp_path, job)
    processes = [
        launch_elastic_node(node, hosts, s3, port, job, logs[node.rank], run_dirs[node.rank], *args)
        for node in hosts.nodes
    ]
    _, offset = _wait_for(logs[0], r'"world_size": 2', processes)
    _, offset = _wait_for(logs[0], r"saved checkpoint .*global_step\d+", processes, start=offset)
    _, offset = _wait_for(logs[0], r"step=\d+/", processes, start=offset)
    return processes, logs, run_dirs, offset


def _time_to_first_new_step(log_path: Path, lost_at: float, processes, start: int) -> float:
    first_step = r"first step, [0-9.]+ s after the previous worker on this node stopped"
    _wait_for(log_path, first_step, processes, JOB_TIMEOUT_S, start)
    return time.monotonic() - lost_at


def test_grow_then_lose_a_killed_node(two_hosts, s3, tmp_path):
    print(two_hosts.describe())
    hosts, job = two_hosts, f"elastic-kill-{tmp_path.name}"
    a, b = hosts.nodes
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    run_dirs = [tmp_path / "a", tmp_path / "b"]
    args = _args(tmp_path, job)

    # Host A alone: world size 1.
    node_a = launch_elastic_node(a, hosts, s3, 29610, job, logs[0], run_dirs[0], *args)
    _wait_for(logs[0], r"step=3/", [node_a])
    assert '"world_size": 1' in read_log(logs[0])

    # Host B arrives: A's agent restarts its workers (they save at once), and the world of two resumes.
    node_b = launch_elastic_node(b, hosts, s3, 29610, job, logs[1], run_dirs[1], *args)
    grown = _change(_wait_for(logs[0], r"the job changed: .*\n", [node_a, node_b])[0].group(0))
    assert f"node 1 ({b.address}" in grown["what"] and "joined" in grown["what"], grown.group(0)
    assert (grown["before"], grown["after"], grown["redone"]) == ("1", "2", "0"), grown.group(0)
    assert grown["why"].startswith("preempted"), grown.group(0)
    grown_at = int(grown["resumed"])
    _, offset = _wait_for(logs[0], rf"step={grown_at + SAVE_INTERVAL + 1}/", [node_a, node_b], start=grown.end())

    # Host B dies: every process on it killed.
    b.kill_all()
    lost_at = time.monotonic()
    first_new_step = _time_to_first_new_step(logs[0], lost_at, [node_a], offset)
    [code] = wait_all([node_a], JOB_TIMEOUT_S)
    log = read_log(logs[0])
    assert code == 0, log[-6000:]
    print(f"host A's first new step {first_new_step:.1f} s after host B was killed")

    lost = next(line for line in log[offset:].splitlines() if "lost peer" in line)
    assert f"node 1 ({b.address}" in lost and "elastic agent restarts" in lost, lost
    shrunk = _change(log, offset)
    assert f"node 1 ({b.address}" in shrunk["what"] and "left" in shrunk["what"], shrunk.group(0)
    assert (shrunk["before"], shrunk["after"]) == ("2", "1"), shrunk.group(0)
    resumed, reached = int(shrunk["resumed"]), int(shrunk["reached"])
    # The newest save after the growth, or, when B died before uploading its shard of it, the one before.
    assert int(shrunk["redone"]) == reached - resumed >= 0 and resumed >= grown_at, shrunk.group(0)
    assert shrunk["why"].startswith("lost peer"), shrunk.group(0)
    assert "saved at world size 2, now 1" in log[offset:] and f"step={TOTAL_STEPS}/{TOTAL_STEPS}" in log[offset:]
    _assert_exact_history(run_dirs[0])


def test_lose_a_node_whose_network_is_cut(two_hosts, s3, tmp_path):
    print(two_hosts.describe())
    if two_hosts.mode != "netns":
        pytest.skip(f"a network cut needs two network namespaces: {two_hosts.reason}")
    b = two_hosts.nodes[1]
    processes, logs, run_dirs, offset = _start_both(two_hosts, s3, tmp_path, f"elastic-cut-{tmp_path.name}", 29620)

    # Host B's link goes down: nothing exits, no connection closes.
    b.set_link(up=False)
    lost_at = time.monotonic()
    try:
        first_new_step = _time_to_first_new_step(logs[0], lost_at, processes[:1], offset)
        [code] = wait_all(processes[:1], JOB_TIMEOUT_S)
    finally:
        b.set_link(up=True)
        b.kill_all()
    log = read_log(logs[0])
    assert code == 0, log[-6000:]
    print(f"host A's first new step {first_new_step:.1f} s after host B's network was cut")

    lost = next(line for line in log[offset:].splitlines() if "lost peer" in line)
    assert f"node 1 ({b.address}" in lost and "no heartbeat" in lost and "elastic agent restarts" in lost, lost
    shrunk = _change(log, offset)
    assert f"node 1 ({b.address}" in shrunk["what"] and "left" in shrunk["what"], shrunk.group(0)
    assert (shrunk["before"], shrunk["after"]) == ("2", "1"), shrunk.group(0)
    assert int(shrunk["redone"]) == int(shrunk["reached"]) - int(shrunk["resumed"]) >= 0, shrunk.group(0)
    assert "saved at world size 2, now 1" in log[offset:] and f"step={TOTAL_STEPS}/{TOTAL_STEPS}" in log[offset:]
    _assert_exact_history(run_dirs[0])


def test_a_preempted_node_leaves_after_a_checkpoint(two_hosts, s3, tmp_path):
    print(two_hosts.describe())
    b = two_hosts.nodes[1]
    processes, logs, run_dirs, offset = _start_both(two_hosts, s3, tmp_path, f"elastic-leave-{tmp_path.name}", 29630)

    # Host B is preempted: its entrypoint gets SIGTERM, as from `docker stop` or a spot notice.
    processes[1].send_signal(signal.SIGTERM)
    [code_b] = wait_all(processes[1:], 120)  # its ranks save with A's; then its agent ends
    log_b = read_log(logs[1])
    assert code_b == 0 and "ending this node's elastic agent" in log_b, log_b[-6000:]
    [code_a] = wait_all(processes[:1], JOB_TIMEOUT_S)
    log = read_log(logs[0])
    assert code_a == 0, log[-6000:]

    stopped = re.compile(r"stopping at step (\d+): preempted").search(log, offset)
    assert stopped, log[offset:][-6000:]
    assert "another node was preempted: the checkpoint at step" in log[stopped.end() :]
    assert "exit code 3, so that the elastic agent re-forms the job without it" in log[stopped.end() :]
    left = _change(log, stopped.end())
    assert f"node 1 ({b.address}" in left["what"] and "left" in left["what"], left.group(0)
    assert (left["before"], left["after"], left["redone"]) == ("2", "1", "0"), left.group(0)
    assert left["resumed"] == left["reached"] == stopped.group(1), left.group(0)
    assert left["why"].startswith("another node was preempted"), left.group(0)
    assert "lost peer" not in log and f"step={TOTAL_STEPS}/{TOTAL_STEPS}" in log[left.end() :]
    _assert_exact_history(run_dirs[0])
