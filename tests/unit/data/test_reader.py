"""The reader on local files: schedule, world-size independence, resume, cache bound, errors."""

import json
import os
import re

import numpy as np
import pytest
import torch

from dsexit.data import DatasetFormatError, DatasetIndex, ShardCorruptError, StreamingShardReader
from dsexit.data.shards import ShardCache
from dsexit.storage import RetryPolicy
from tests.helpers.datasets import decode_sample_numbers, write_synthetic_dataset

NUM_SAMPLES, ROWS_PER_SHARD, GLOBAL_BATCH = 203, 16, 24  # 8 steps an epoch; 11 samples dropped


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("synthetic") / "ds")
    write_synthetic_dataset(url, NUM_SAMPLES, ROWS_PER_SHARD)
    return url


def _reader(url, **overrides):
    options = dict(global_batch_size=GLOBAL_BATCH, micro_batch_size=4, seed=7, shuffle_window=3, prefetch=3)
    options.update(overrides)
    return StreamingShardReader(url, **options)


def _take_steps(readers, steps):
    """Global batches as the trainer sees them: each rank's micro-batches of a step, ranks in order."""
    micro_per_step = readers[0].micro_batches_per_step
    batches = []
    for _ in range(steps):
        for reader in readers:
            batches += [next(reader) for _ in range(micro_per_step)]
    return batches


def _sample_numbers(batches):
    return [number for batch in batches for number in decode_sample_numbers(batch["input_ids"])]


def test_batches_have_the_documented_keys_shapes_and_masks(dataset):
    with _reader(dataset) as reader:
        batch = next(reader)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    for tensor in batch.values():
        assert tensor.dtype == torch.long and tensor.shape == (4, 16)
    assert torch.equal(batch["attention_mask"][0], torch.tensor([1, 1, 1, 1] + [0] * 12))


def test_order_is_independent_of_world_size_and_each_epoch_covers_the_data_once(dataset):
    steps = 2 * (NUM_SAMPLES // GLOBAL_BATCH)  # two full epochs
    with _reader(dataset, micro_batch_size=8) as single:
        alone = _sample_numbers(_take_steps([single], steps))
    ranks = [_reader(dataset, dp_rank=r, dp_size=3, micro_batch_size=2) for r in range(3)]
    together = _sample_numbers(_take_steps(ranks, steps))
    for reader in ranks:
        reader.close()
    assert together == alone

    per_epoch = NUM_SAMPLES // GLOBAL_BATCH * GLOBAL_BATCH
    first, second = alone[:per_epoch], alone[per_epoch:]
    assert len(set(first)) == per_epoch and set(first) <= set(range(NUM_SAMPLES))
    assert len(set(second)) == per_epoch
    assert first != second, "a new epoch must bring a new permutation"


def test_epoch_is_the_dataset_exactly_once_when_the_batch_divides_it(tmp_path):
    url = str(tmp_path / "ds")
    write_synthetic_dataset(url, 96, 10)
    ranks = [_reader(url, dp_rank=r, dp_size=2, global_batch_size=16, micro_batch_size=4) for r in range(2)]
    seen = _sample_numbers(_take_steps(ranks, 96 // 16))
    assert sorted(seen) == list(range(96))


def test_each_rank_reads_its_contiguous_slice_of_the_global_batch(dataset):
    with _reader(dataset, dp_rank=1, dp_size=2, micro_batch_size=3) as reader:
        batches = [next(reader) for _ in range(reader.micro_batches_per_step)]
        expected = reader.sample_ids(0, 0).tolist() + reader.sample_ids(0, 6).tolist()
        assert reader.micro_batches_per_step == 4
        assert reader.state_dict()["samples_consumed"] == GLOBAL_BATCH
        step_order = np.concatenate([reader.sample_ids(0, 0)])
    assert _sample_numbers(batches)[:6] == expected
    with _reader(dataset, micro_batch_size=24) as whole:
        global_batch = decode_sample_numbers(next(whole)["input_ids"])
    assert _sample_numbers(batches) == global_batch[12:24]
    assert step_order.tolist() == global_batch[12:15]


@pytest.mark.parametrize("before, after", [((1, 4), (1, 4)), ((2, 2), (2, 2)), ((2, 4), (1, 8)), ((1, 4), (3, 4))])
def test_resume_equals_an_uninterrupted_run(dataset, before, after):
    (dp_before, micro_before), (dp_after, micro_after) = before, after
    total_steps, stop_at = 12, 5  # crosses the epoch end (8 steps)
    with _reader(dataset, micro_batch_size=4) as reference:
        uninterrupted = _sample_numbers(_take_steps([reference], total_steps))

    first = [_reader(dataset, dp_rank=r, dp_size=dp_before, micro_batch_size=micro_before) for r in range(dp_before)]
    seen = _sample_numbers(_take_steps(first, stop_at))
    next(first[0])  # prefetched and taken beyond the checkpoint by nobody else: must not count
    states = [reader.state_dict() for reader in first]
    for reader in first:
        reader.close()
    assert states[0]["samples_consumed"] == stop_at * GLOBAL_BATCH + micro_before * dp_before
    state = states[1] if dp_before > 1 else dict(states[0], samples_consumed=stop_at * GLOBAL_BATCH)

    second = [_reader(dataset, dp_rank=r, dp_size=dp_after, micro_batch_size=micro_after) for r in range(dp_after)]
    for reader in second:
        reader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would store it
    seen += _sample_numbers(_take_steps(second, total_steps - stop_at))
    for reader in second:
        reader.close()
    assert seen == uninterrupted


def test_resume_mid_step_needs_the_same_layout_and_the_same_order(dataset):
    with _reader(dataset) as reader:
        next(reader)
        state = reader.state_dict()
    with _reader(dataset, dp_size=2, micro_batch_size=2) as other, pytest.raises(ValueError, match="mid-step"):
        other.load_state_dict(state)
    with _reader(dataset, seed=8) as other, pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)
    with _reader(dataset, global_batch_size=48) as other, pytest.raises(ValueError, match="global_batch_size=24"):
        other.load_state_dict(state)
    with _reader(dataset) as same:
        same.load_state_dict(state)
        assert same.state_dict()["samples_consumed"] == 4


def test_bad_layouts_are_rejected_before_reading(dataset):
    with pytest.raises(ValueError, match="global_batch_size=24 must be a multiple"):
        StreamingShardReader(dataset, global_batch_size=24, micro_batch_size=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StreamingShardReader(dataset, global_batch_size=1024, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        StreamingShardReader(dataset, global_batch_size=24, micro_batch_size=4, dp_rank=2, dp_size=2)


def test_cache_holds_at_most_its_bound_and_evicts_least_recently_used(dataset, tmp_path):
    index = DatasetIndex.load(dataset)
    shard_bytes = index.shards[0].num_bytes
    cache = ShardCache(str(tmp_path / "cache"), 3 * shard_bytes, RetryPolicy(0))

    def get(n):
        return cache.get(index.shard_url(index.shards[n]), index.shards[n].sha256, index.shards[n].num_bytes)

    for number in (0, 1, 2):
        get(number)
    get(0)  # 0 becomes most recent, so 1 is the oldest
    get(3)
    assert cache.cached_names() == [index.shards[n].sha256 for n in (2, 0, 3)]
    assert cache.total_bytes <= 3 * shard_bytes
    assert sum(os.path.getsize(tmp_path / "cache" / f) for f in os.listdir(tmp_path / "cache")) <= 3 * shard_bytes
    assert cache.downloads == 4
    # A reader through a small cache still yields exactly the samples of one with room for everything.
    with (
        _reader(dataset, cache_dir=str(tmp_path / "small"), cache_max_bytes=2 * shard_bytes, shuffle_window=1) as small,
        _reader(dataset, shuffle_window=1) as roomy,
    ):
        assert _sample_numbers([next(small) for _ in range(60)]) == _sample_numbers([next(roomy) for _ in range(60)])
        assert small.cache.total_bytes <= 2 * shard_bytes
    with pytest.raises(ValueError, match="smaller than the largest shard"):
        _reader(dataset, cache_max_bytes=shard_bytes - 1)


def test_corrupt_shard_is_fetched_twice_then_named_with_both_hashes(tmp_path):
    url = str(tmp_path / "ds")
    index = write_synthetic_dataset(url, 48, 48)
    with open(os.path.join(url, "shard-00000.bin"), "r+b") as shard:
        shard.seek(5)
        shard.write(b"\xff")
    with _reader(url) as reader, pytest.raises(ShardCorruptError) as error:
        next(reader)
    message = str(error.value)
    assert os.path.join(url, "shard-00000.bin") in message and index.shards[0].sha256 in message
    assert len(set(re.findall(r"\b[0-9a-f]{64}\b", message))) == 2, message
    assert reader.cache.downloads == 2


def test_missing_dataset_and_malformed_index_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        DatasetIndex.load(str(tmp_path / "nowhere"))
    url = str(tmp_path / "ds")
    write_synthetic_dataset(url, 32, 16)
    index_path = os.path.join(url, "index.json")
    body = json.load(open(index_path))
    cases = {
        "{not json": "is not valid JSON",
        json.dumps(dict(body, format_version=99)): "format_version 99",
        json.dumps({k: v for k, v in body.items() if k != "seq_len"}): "malformed field",
        json.dumps(dict(body, dtype="float32")): "dtype 'float32'",
        json.dumps(dict(body, shards=[dict(body["shards"][0], num_bytes=7)])): "shard-00000.bin has 7 bytes",
    }
    for text, expected in cases.items():
        with open(index_path, "w") as handle:
            handle.write(text)
        with pytest.raises(DatasetFormatError, match=expected) as error:
            DatasetIndex.load(url)
        assert index_path in str(error.value)
