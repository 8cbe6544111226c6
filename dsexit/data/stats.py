"""Corpus statistics read from the shards: token frequencies (for the unigram generator study)."""

from __future__ import annotations

import numpy as np

from dsexit.data.index import DatasetIndex
from dsexit.data.storage import RetryPolicy, ShardCache


def token_counts(index: DatasetIndex, *, cache_dir: str | None = None, storage_options: dict | None = None,
                 cache_max_bytes: int = 8 << 30) -> np.ndarray:
    """How often each vocabulary id occurs in the dataset (padding included; callers drop specials)."""
    cache = ShardCache(cache_dir, cache_max_bytes, RetryPolicy(), storage_options)
    counts = np.zeros(index.vocab_size, dtype=np.int64)
    dtype = np.dtype(index.dtype).newbyteorder("<")
    for shard in index.shards:
        path = cache.get(index.shard_url(shard), shard.sha256, shard.num_bytes)
        counts += np.bincount(np.memmap(path, dtype=dtype, mode="r"), minlength=index.vocab_size)[:index.vocab_size]
    return counts
