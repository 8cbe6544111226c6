"""Which checkpoint two nodes with their own disks resume from, when the newest save reached
rank 0's disk but not the mirror (a real S3 server; two real processes joined by gloo).

A node lost during an upload leaves the newest step complete on rank 0's disk alone: the other
node cannot load it, so both must resume from the mirror's newest. Where every node holds that
step (a shared filesystem), it stays the choice although the mirror lacks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec

from dsexit.storage import RetryPolicy
from dsexit.train.checkpoint.files import MARKER
from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.cluster.distributed import WorldInfo
from tests.helpers import REPO
from tests.helpers.checkpoints import FakeEngine
from tests.helpers.servers import free_port

ENTRY = str(Path(__file__).with_name("node_choice_entry.py"))


def _saved_on_node0(url: str, root: Path, s3_server, monkeypatch) -> None:
    """Node 0 saves steps 2 and 4; step 4's upload fails (the link to the mirror went down)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    # fsspec reuses an s3 filesystem made earlier in this process, which may hold another server's endpoint
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    manager = CheckpointManager(url, str(root), 3, WorldInfo(0, 1, 0, 1, "single"), policy=RetryPolicy(0))
    engine = FakeEngine()
    manager.save(engine, 2, {})

    def unreachable(*args, **kwargs):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(manager.mirror.remote.fs, "put_file", unreachable)
    manager.save(engine, 4, {})
    assert (root / "global_step4" / MARKER).exists()
    assert manager.mirror.remote.read_text(f"global_step4/{MARKER}") is None


def _choose(url: str, roots: list[Path], env: dict) -> tuple[list[dict], list[str]]:
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, ENTRY, str(rank), port, url, str(root)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, root in enumerate(roots)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs], outputs


def _env(s3_server) -> dict:
    return {**os.environ, **s3_server.env, "OMP_NUM_THREADS": "1"}


def test_a_step_only_rank_0_holds_gives_way_to_the_mirrors_newest(s3_server, tmp_path, monkeypatch):
    url = f"{s3_server.make_bucket()}/{uuid.uuid4().hex[:8]}/checkpoints"
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    _saved_on_node0(url, node0, s3_server, monkeypatch)
    node1.mkdir()
    chosen, outputs = _choose(url, [node0, node1], _env(s3_server))
    assert [choice.get("tag") for choice in chosen] == ["global_step2", "global_step2"], outputs
    assert "global_step4 is complete on this node only" in outputs[0]
    assert (node1 / "global_step2" / MARKER).exists()  # node 1 fetched it from the mirror
    assert (node0 / "global_step4" / MARKER).exists()  # nothing the run wrote is removed


def test_a_step_every_node_holds_stays_the_choice_without_the_mirror(s3_server, tmp_path, monkeypatch):
    url = f"{s3_server.make_bucket()}/{uuid.uuid4().hex[:8]}/checkpoints"
    shared = tmp_path / "shared"
    _saved_on_node0(url, shared, s3_server, monkeypatch)
    chosen, outputs = _choose(url, [shared, shared], _env(s3_server))
    assert [choice.get("tag") for choice in chosen] == ["global_step4", "global_step4"], outputs
