"""Fixtures for the multi-node tests: two hosts (network namespaces), an S3 server on node 0
holding the data and the checkpoints, and helpers that launch real trainer processes.

Every run is electra-tiny on the embedded corpus (uploaded to the S3 server), global batch 8,
a few steps: seconds of compute, so most of a test's time is process start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.servers import S3Server, free_port
from tests.integration.cluster.hosts import Node, TwoHosts

VENV_BIN = Path(sys.executable).parent
BUCKET = "dsexit-cluster"
GLOBAL_BATCH = 8
# What every cluster test trains: small, fast, one log line and one metrics record per step.
TINY_RUN = [
    "--model",
    "electra-tiny",
    "--global-batch-size",
    str(GLOBAL_BATCH),
    "--micro-batch-size",
    "4",
    "--log-interval",
    "1",
    "--progress",
    "lines",
    "--eval-samples",
    "64",
    "--no-export-hf",
    "--no-tensorboard",
    "--no-csv",
]


def node_env(node: Node, **extra: str) -> dict[str, str]:
    """Environment of a node's launcher: CPU DeepSpeed, one thread per rank, gloo on the node's interface."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": node.interface,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    env.update(extra)
    return env


def wait_all(processes: list[subprocess.Popen], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_text(path: Path, text: str, seconds: float, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in read_log(path):
            return
        if any(process.poll() is not None for process in processes):
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {seconds:.0f} s:\n{read_log(path)[-4000:]}")


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training records (held-out evaluation records left out)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [record for record in records if record.get("kind", "train") == "train"]


def reference_digests(steps: int, seed: int = 1234, global_batch: int = GLOBAL_BATCH) -> list[str]:
    """metrics.jsonl's per-step `samples_digest` for steps 1..steps, computed from the data reader's
    deterministic order on one process (no training): the samples an uninterrupted run must see."""
    import hashlib
    import tempfile

    from dsexit.data import DEFAULT_DATA_URL, StreamingShardReader
    from dsexit.train.step_stats import sample_fingerprints

    digests = []
    with (
        tempfile.TemporaryDirectory() as cache,
        StreamingShardReader(
            DEFAULT_DATA_URL,
            global_batch_size=global_batch,
            micro_batch_size=global_batch,
            seed=seed,
            prefetch=0,
            cache_dir=cache,
        ) as reader,
    ):
        for _ in range(steps):
            fingerprints = sample_fingerprints(next(reader)["input_ids"])
            step = hashlib.blake2b(fingerprints.sort().values.numpy().tobytes(), digest_size=8).hexdigest()
            digests.append(hashlib.blake2b(step.encode(), digest_size=8).hexdigest())  # a 1-step interval
    return digests


def seed_bucket(server: S3Server, node: Node) -> None:
    """Upload the embedded corpus to s3://BUCKET/data from node 0 (where the server is reachable)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['seed_s3.py', 's3://{BUCKET}/data']\n"
        f"runpy.run_path({str(REPO / 'docker' / 'seed_s3.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        node.prefix + [sys.executable, "-c", code],
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode:
        raise RuntimeError(f"seeding s3://{BUCKET}/data failed:\n{result.stderr}")


@pytest.fixture(scope="session")
def two_hosts(request):
    hosts = TwoHosts(f"dsx{os.getpid() % 100000}")
    print(f"\n{hosts.describe()}")
    request.addfinalizer(hosts.close)
    return hosts


@pytest.fixture(scope="session")
def s3(two_hosts, tmp_path_factory):
    """moto's S3 server on node 0, with the embedded corpus uploaded to s3://BUCKET/data."""
    node = two_hosts.nodes[0]
    server = S3Server(
        tmp_path_factory.mktemp("s3"),
        host=node.address,
        port=9000 if two_hosts.mode == "netns" else free_port(),
        prefix=node.prefix,
    ).start()
    seed_bucket(server, node)
    yield server
    server.stop()


def entrypoint_command(*args: str) -> list[str]:
    return [str(REPO / "docker" / "entrypoint.sh"), *args]


def launch_node(
    node: Node, hosts: TwoHosts, s3: S3Server, master_port: int, log_path: Path, run_dir: Path, *args: str
) -> subprocess.Popen:
    """docker/entrypoint.sh on `node`: one DeepSpeed launcher, one rank, data and checkpoints on S3."""
    return _entrypoint_on(node, hosts, s3, master_port, log_path, run_dir, args, NNODES="2")


def _entrypoint_on(
    node: Node, hosts: TwoHosts, s3: S3Server, port: int, log_path: Path, run_dir: Path, args, **layout: str
) -> subprocess.Popen:
    """docker/entrypoint.sh on `node` with the job's `layout` (NNODES, ...) in its environment."""
    env = node_env(
        node,
        **s3.env,
        NODE_RANK=str(node.rank),
        MASTER_ADDR=hosts.nodes[0].address,
        MASTER_PORT=str(port),
        NPROC_PER_NODE="1",
        **layout,
    )
    command = entrypoint_command("--run-dir", str(run_dir), "--data", f"s3://{BUCKET}/data", *TINY_RUN, *args)
    return node.start(command, log_path, env, cwd=str(REPO))


# Elastic jobs: the rendezvous settles 3 s after the first node arrives, and a node whose agent stops
# answering leaves it after 3 s (torchrun's defaults: 30 s and 15 s).
ELASTIC_RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"


def launch_elastic_node(
    node: Node, hosts: TwoHosts, s3: S3Server, port: int, job: str, log_path: Path, run_dir: Path, *args: str
) -> subprocess.Popen:
    """docker/entrypoint.sh on `node` as one node of an elastic job of 1 to 2 nodes (torchrun's agent,
    the rendezvous store on node 0); one rank per node, data and checkpoints on S3."""
    return _entrypoint_on(
        node,
        hosts,
        s3,
        port,
        log_path,
        run_dir,
        args,
        NNODES="1:2",
        LOCAL_ADDR=node.address,  # both namespaces share a host name: order the nodes by address
        RDZV_CONF=ELASTIC_RDZV_CONF,
        DSEXIT_JOB_ID=job,
    )
