"""Against a real S3 server (moto_server on 127.0.0.1): prepare, stream, resume, outages, errors."""

import io
import re
import threading
import time

import fsspec
import pytest
import torch

from dsexit.data import DEFAULT_DATA_URL, DatasetFormatError, DatasetIndex, ShardCorruptError, StreamingShardReader
from dsexit.data.prepare import prepare_dataset
from tests.helpers.datasets import decode_sample_numbers, shared_file, write_synthetic_dataset

OUTAGE_S = 4.0


def _s3_fs(server):
    return fsspec.filesystem("s3", **server.storage_options)


def _upload(local_dir, url, server):
    fs = _s3_fs(server)
    fs.put(f"{local_dir}/", url.removeprefix("s3://"), recursive=True)
    fs.invalidate_cache()


def test_prepare_to_s3_streams_back_the_same_samples_as_a_local_copy(s3_server, s3_bucket, tmp_path):
    source = str(shared_file("corpus/moby_dick.jsonl.gz"))
    vocab = f"wordpiece:{DEFAULT_DATA_URL}/vocab.txt"
    url = f"{s3_bucket}/moby"
    options = dict(seq_len=64, shard_mb=0.1, overwrite=True, progress_stream=io.StringIO())
    remote = prepare_dataset([source], url, vocab, storage_options=s3_server.storage_options, **options)
    local = prepare_dataset([source], str(tmp_path / "moby"), vocab, **options)
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards] and len(remote.shards) > 3
    assert DatasetIndex.load(url, s3_server.storage_options).to_json() == local.to_json()

    layout = dict(global_batch_size=32, micro_batch_size=16, dp_rank=1, dp_size=2, seed=3, shuffle_window=2)
    with (
        StreamingShardReader(url, storage_options=s3_server.storage_options, **layout) as from_s3,
        StreamingShardReader(str(tmp_path / "moby"), **layout) as from_disk,
    ):
        for _ in range(40):
            a, b = next(from_s3), next(from_disk)
            assert all(torch.equal(a[key], b[key]) for key in a)
        assert from_s3.cache.downloads > 0


def test_resume_from_s3_at_another_world_size_equals_an_uninterrupted_run(s3_server, s3_bucket):
    url = f"{s3_bucket}/synthetic-resume"
    write_synthetic_dataset(url, 150, 20, storage_options=s3_server.storage_options)
    options = dict(global_batch_size=16, seed=1, shuffle_window=2, storage_options=s3_server.storage_options)
    with StreamingShardReader(url, micro_batch_size=8, **options) as reference:
        uninterrupted = [n for _ in range(24) for n in decode_sample_numbers(next(reference)["input_ids"])]
    ranks = [StreamingShardReader(url, micro_batch_size=4, dp_rank=r, dp_size=2, **options) for r in range(2)]
    seen = []
    for _ in range(5):  # 5 steps, 2 micro-batches per rank
        for reader in ranks:
            seen += [n for _ in range(2) for n in decode_sample_numbers(next(reader)["input_ids"])]
    state = ranks[0].state_dict()
    for reader in ranks:
        reader.close()
    with StreamingShardReader(url, micro_batch_size=8, **options) as resumed:
        resumed.load_state_dict(state)
        seen += [n for _ in range(24 - 10) for n in decode_sample_numbers(next(resumed)["input_ids"])]
    assert seen == uninterrupted


def test_server_restart_mid_stream_loses_and_repeats_nothing(restartable_s3, tmp_path):
    """moto forgets everything on restart, so the dataset is uploaded again once it is back."""
    local = str(tmp_path / "ds")
    write_synthetic_dataset(local, 240, 8)  # 30 small shards, one per window: the reader must keep fetching
    bucket = restartable_s3.make_bucket()
    url = f"{bucket}/synthetic"
    _upload(local, url, restartable_s3)
    options = dict(global_batch_size=8, micro_batch_size=8, seed=2, shuffle_window=1, prefetch=1)
    with StreamingShardReader(local, **options) as reference:
        expected = [n for _ in range(60) for n in decode_sample_numbers(next(reference)["input_ids"])]

    # botocore's own retries off, and an outage longer than s3fs's ~2 s of retries, so it reaches the reader's.
    storage_options = dict(restartable_s3.storage_options, config_kwargs={"retries": {"max_attempts": 1}})
    reader = StreamingShardReader(
        url,
        storage_options=storage_options,
        retries=8,
        retry_base_delay_s=0.1,
        cache_dir=str(tmp_path / "cache"),
        **options,
    )
    seen = [n for _ in range(10) for n in decode_sample_numbers(next(reader)["input_ids"])]
    restartable_s3.stop()
    outage_started = time.monotonic()

    def come_back():
        time.sleep(OUTAGE_S)
        restartable_s3.start()
        restartable_s3.make_bucket()
        _upload(local, url, restartable_s3)

    restarter = threading.Thread(target=come_back)
    restarter.start()
    seen += [n for _ in range(50) for n in decode_sample_numbers(next(reader)["input_ids"])]
    restarter.join()
    reader.close()
    assert time.monotonic() - outage_started >= OUTAGE_S, "the reader never needed the server during the outage"
    assert reader.policy.retries_made > 0
    assert seen == expected


def test_corrupt_shard_on_s3_names_the_shard_url_and_both_hashes(s3_server, s3_bucket):
    url = f"{s3_bucket}/synthetic-corrupt"
    index = write_synthetic_dataset(url, 64, 32, storage_options=s3_server.storage_options)
    fs = _s3_fs(s3_server)
    path = f"{url.removeprefix('s3://')}/shard-00001.bin"
    data = bytearray(fs.cat_file(path))
    data[40] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with StreamingShardReader(
        url, global_batch_size=64, micro_batch_size=64, storage_options=s3_server.storage_options
    ) as reader:
        with pytest.raises(ShardCorruptError) as error:
            next(reader)
    message = str(error.value)
    assert f"{url}/shard-00001.bin" in message and index.shards[1].sha256 in message
    assert len(set(re.findall(r"\b[0-9a-f]{64}\b", message))) == 2


def test_missing_url_and_malformed_index_on_s3_are_named(s3_server, s3_bucket):
    with pytest.raises(FileNotFoundError, match=f"No dataset at {s3_bucket}/absent"):
        StreamingShardReader(
            f"{s3_bucket}/absent", global_batch_size=8, micro_batch_size=8, storage_options=s3_server.storage_options
        )
    url = f"{s3_bucket}/synthetic-malformed"
    write_synthetic_dataset(url, 16, 16, storage_options=s3_server.storage_options)
    _s3_fs(s3_server).pipe_file(f"{url.removeprefix('s3://')}/index.json", b'{"format": "something-else"}')
    with pytest.raises(DatasetFormatError, match=re.escape(f"{url}/index.json is not a dsexit dataset index")):
        DatasetIndex.load(url, s3_server.storage_options)
