"""Two real processes on one cache directory (the ranks of one node): each shard is downloaded once
per node, and both processes read the exact bytes index.json lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from dsexit.data import DatasetIndex
from tests.helpers import REPO
from tests.helpers.datasets import write_synthetic_dataset

RANK = r"""
import hashlib, json, os, sys, time
import numpy as np
import dsexit.data.shards as shards
from dsexit.storage import RetryPolicy
from dsexit.data import DatasetIndex
from dsexit.data.reader import open_shard

url, cache_dir, barrier, name = sys.argv[1:5]
real_download = shards._download_hashing

def slow_download(fs, path, destination):
    time.sleep(0.3)
    return real_download(fs, path, destination)

shards._download_hashing = slow_download
index = DatasetIndex.load(url)
cache = shards.ShardCache(cache_dir, 1 << 30, RetryPolicy(0))
open(os.path.join(barrier, name), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.01)
digests = [hashlib.sha256(np.ascontiguousarray(open_shard(cache, index, shard)).tobytes()).hexdigest()
           for shard in index.shards]
print(json.dumps({"downloads": cache.downloads, "digests": digests}))
"""


def test_two_processes_on_one_cache_download_each_shard_once_and_read_correct_bytes(tmp_path):
    url = "file://" + str(tmp_path / "remote")
    write_synthetic_dataset(url, 64, 16)
    index = DatasetIndex.load(url)
    cache_dir, barrier = tmp_path / "node-cache", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, url, str(cache_dir), str(barrier), f"rank{rank}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((barrier / f"rank{rank}").exists() for rank in range(2)):
        assert time.monotonic() < deadline and all(rank.poll() is None for rank in ranks), [
            rank.communicate() for rank in ranks if rank.poll() is not None
        ]
        time.sleep(0.05)
    (barrier / "go").touch()
    results = []
    for rank in ranks:
        stdout, stderr = rank.communicate(timeout=120)
        assert rank.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))

    assert sum(result["downloads"] for result in results) == len(index.shards)  # once per node, not per rank
    expected = [shard.sha256 for shard in index.shards]
    assert [result["digests"] for result in results] == [expected, expected]
    assert sorted(name for name in os.listdir(cache_dir) if name.endswith(".bin")) == sorted(
        f"{sha256}.bin" for sha256 in expected
    )
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".part")]
