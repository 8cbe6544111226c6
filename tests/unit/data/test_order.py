"""The epoch order (dsexit/data/order.py): each epoch is every sample exactly once, fixed by (seed,
epoch), the same however its positions are read, and local to windows of `shuffle_window` shards."""

from __future__ import annotations

import numpy as np
import pytest

from dsexit.data.index import DatasetIndex, ShardInfo
from dsexit.data.order import EpochOrder

SHARD_SIZES = [7, 3, 10, 1, 8, 5, 6]  # uneven, as the last shard of each input file is


def _index(sizes=SHARD_SIZES) -> DatasetIndex:
    shards = [
        ShardInfo(name=f"shard-{n:05d}.bin", num_samples=size, num_bytes=size * 32, sha256="0" * 64)
        for n, size in enumerate(sizes)
    ]
    return DatasetIndex(seq_len=16, dtype="uint16", vocab_size=100, special_tokens={}, tokenizer={}, shards=shards)


def _epoch(seed=0, epoch=0, window=3) -> np.ndarray:
    order = EpochOrder(_index(), seed, epoch, window)
    return order.samples(0, order.num_samples)


@pytest.mark.parametrize("window", [1, 2, 3, len(SHARD_SIZES), 100])
def test_an_epoch_is_every_sample_exactly_once(window):
    samples = _epoch(window=window)
    assert sorted(samples.tolist()) == list(range(sum(SHARD_SIZES)))


def test_the_order_is_fixed_by_seed_and_epoch():
    assert np.array_equal(_epoch(seed=4, epoch=2), _epoch(seed=4, epoch=2))
    others = [_epoch(seed=5, epoch=2), _epoch(seed=4, epoch=3)]
    assert all(not np.array_equal(other, _epoch(seed=4, epoch=2)) for other in others)
    assert not np.array_equal(_epoch(window=100), np.arange(sum(SHARD_SIZES)))  # it does shuffle


@pytest.mark.parametrize("chunk", [1, 4, 6, 13])
def test_positions_read_in_any_chunks_give_the_same_sequence(chunk):
    """What the reader relies on for world-size independence: ranks and resumes read slices."""
    whole = _epoch(seed=1, epoch=1)
    order = EpochOrder(_index(), 1, 1, 3)
    pieces = [
        order.samples(start, min(start + chunk, order.num_samples)) for start in range(0, order.num_samples, chunk)
    ]
    assert np.array_equal(np.concatenate(pieces), whole)
    fresh = EpochOrder(_index(), 1, 1, 3)  # a resumed reader starts mid-epoch with nothing cached
    assert np.array_equal(fresh.samples(17, 30), whole[17:30])
    assert np.array_equal(fresh.samples(2, 5), whole[2:5])  # and reading backwards still agrees


def test_each_window_holds_only_its_own_shards_samples():
    index = _index()
    starts = index.shard_starts()
    order = EpochOrder(index, 3, 0, 3)
    assert sorted(shard for window in order.window_shards for shard in window) == list(range(len(SHARD_SIZES)))
    assert all(len(window) == 3 for window in order.window_shards[:-1])
    position = 0
    for number, shards in enumerate(order.window_shards):
        size = sum(SHARD_SIZES[shard] for shard in shards)
        own = {sample for shard in shards for sample in range(starts[shard], starts[shard] + SHARD_SIZES[shard])}
        assert set(order.samples(position, position + size).tolist()) == own
        assert order.window_of(position) == number and order.window_of(position + size - 1) == number
        position += size
    assert position == order.num_samples


def test_bad_windows_and_positions_are_named():
    with pytest.raises(ValueError, match="shuffle_window.*0"):
        EpochOrder(_index(), 0, 0, 0)
    order = EpochOrder(_index(), 0, 0, 2)
    with pytest.raises(IndexError, match=str(order.num_samples)):
        order.samples(0, order.num_samples + 1)
    assert order.samples(5, 5).size == 0
