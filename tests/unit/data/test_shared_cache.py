"""One node's shard cache in process: unique temporary names, and a shard another rank evicted
is fetched again. Two real processes on one cache: tests/integration/data/test_shared_cache.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dsexit.data import DatasetIndex
from dsexit.storage import temporary_name
from tests.helpers.datasets import write_synthetic_dataset


def test_temporary_names_differ_between_calls_of_one_thread():
    names = {temporary_name("/cache/abc.bin") for _ in range(3)}
    assert len(names) == 3
    assert all(f".{os.getpid()}-" in name and name.endswith(".part") for name in names)


def test_a_shard_another_rank_evicted_is_fetched_again(tmp_path):
    from dsexit.data.shards import ShardCache
    from dsexit.storage import RetryPolicy

    url = str(tmp_path / "remote")
    write_synthetic_dataset(url, 32, 16)
    index = DatasetIndex.load(url)
    shard = index.shards[0]
    mine = ShardCache(str(tmp_path / "cache"), 1 << 20, RetryPolicy(0))
    path = mine.get(index.shard_url(shard), shard.sha256, shard.num_bytes)
    os.unlink(path)  # what another rank's LRU does to a file this one still counts
    again = mine.get(index.shard_url(shard), shard.sha256, shard.num_bytes)
    assert hashlib.sha256(Path(again).read_bytes()).hexdigest() == shard.sha256
    assert mine.downloads == 2
