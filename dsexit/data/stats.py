"""Corpus statistics read from the shards: token frequencies (for the unigram generator study)."""

from __future__ import annotations

import numpy as np

from dsexit.data.index import DatasetIndex
from dsexit.data.reader import open_shard
from dsexit.data.shards import DEFAULT_CACHE_MAX_BYTES, ShardCache
from dsexit.storage import RetryPolicy


def token_counts(
    index: DatasetIndex,
    *,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
    max_shards: int | None = None,
) -> np.ndarray:
    """How often each vocabulary id occurs in the training shards (padding included; callers drop specials);
    `max_shards` counts only the first ones (an estimate that does not read a large dataset whole)."""
    cache = ShardCache(cache_dir, cache_max_bytes, RetryPolicy(), storage_options)
    counts = np.zeros(index.vocab_size, dtype=np.int64)
    for shard in index.shards[:max_shards]:
        counts += np.bincount(open_shard(cache, index, shard).ravel(), minlength=index.vocab_size)[: index.vocab_size]
    return counts
