"""prepare_data never deletes what it did not write, on a real S3 server (moto_server on 127.0.0.1).

The local cases are in tests/unit/data/test_overwrite.py. "Untouched" is checked byte for byte
over every object of the test's own bucket.
"""

import io
import json
import secrets
import subprocess
import sys

import fsspec
import pytest

from dsexit.data import DatasetIndex
from dsexit.data.prepare import prepare_dataset
from dsexit.data.writer import OutputRefusedError, listed_files
from tests.helpers import REPO
from tests.helpers.datasets import DEFAULT_VOCAB, jsonl_corpus

SCRIPT = REPO / "launch" / "prepare_data.py"


def _s3_snapshot(fs, bucket: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {key: fs.cat_file(key) for key in sorted(fs.find(bucket))}


@pytest.fixture
def own_bucket(s3_server):
    """A bucket of this test's own, so the objects it holds are exactly those the test put there."""
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    bucket = f"dsexit-overwrite-{secrets.token_hex(4)}"
    fs.mkdir(bucket)
    return fs, bucket


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_s3_bucket_with_unrelated_objects_survives_overwrite(s3_server, own_bucket, tmp_path):
    fs, bucket = own_bucket
    fs.pipe_file(f"{bucket}/notes/readme.txt", b"someone else's notes")
    fs.pipe_file(f"{bucket}/photo.jpg", b"\xff\xd8 not ours")
    fs.put_file(str(jsonl_corpus(tmp_path / "corpus.jsonl", 30)), f"{bucket}/corpus.jsonl")  # the input, inside --out
    before = _s3_snapshot(fs, bucket)
    result = _cli(
        "--input",
        f"s3://{bucket}/corpus.jsonl",
        "--out",
        f"s3://{bucket}",
        "--tokenizer",
        f"wordpiece:{DEFAULT_VOCAB}",
        "--seq-len",
        "32",
        "--shard-mb",
        "0.01",
        "--overwrite",
        "--storage-options",
        json.dumps(s3_server.storage_options),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("prepare_data: error:"), result.stderr
    assert f"s3://{bucket}" in result.stderr  # the one line names the refused output
    assert _s3_snapshot(fs, bucket) == before


def test_s3_failing_input_leaves_the_old_dataset_and_its_neighbours_byte_identical(s3_server, own_bucket, tmp_path):
    fs, bucket = own_bucket
    url = f"s3://{bucket}/ds"
    options = dict(seq_len=32, shard_mb=0.01, storage_options=s3_server.storage_options, progress_stream=io.StringIO())
    prepare_dataset(
        [str(jsonl_corpus(tmp_path / "good.jsonl", 400))],
        url,
        f"wordpiece:{DEFAULT_VOCAB}",
        validation_fraction=0.1,
        **options,
    )
    fs.pipe_file(f"{bucket}/ds-other/keep.txt", b"a sibling prefix that starts with the same letters")
    fs.pipe_file(f"{bucket}/ds.txt", b"a sibling object")
    before = _s3_snapshot(fs, bucket)

    bad = jsonl_corpus(tmp_path / "bad.jsonl", 3001, bad_line=3001)
    with pytest.raises(ValueError, match="bad.jsonl line 3001 is not valid JSON"):
        prepare_dataset([str(bad)], url, f"wordpiece:{DEFAULT_VOCAB}", overwrite=True, **options)
    assert _s3_snapshot(fs, bucket) == before  # no staging object is left either

    new = prepare_dataset(
        [str(jsonl_corpus(tmp_path / "small.jsonl", 20))],
        url,
        f"wordpiece:{DEFAULT_VOCAB}",
        overwrite=True,
        validation_fraction=0,
        **options,
    )
    after = _s3_snapshot(fs, bucket)
    assert {key.removeprefix(f"{bucket}/ds/") for key in after if key.startswith(f"{bucket}/ds/")} == listed_files(new)
    assert {key: data for key, data in after.items() if not key.startswith(f"{bucket}/ds/")} == {
        key: data for key, data in before.items() if not key.startswith(f"{bucket}/ds/")
    }
    assert DatasetIndex.load(url, s3_server.storage_options).to_json() == new.to_json()


def test_s3_output_in_a_missing_bucket_is_one_line_and_creates_no_bucket(s3_server, tmp_path):
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    bucket = f"dsexit-absent-{secrets.token_hex(4)}"
    with pytest.raises(OutputRefusedError, match=f"s3://{bucket}/ds"):
        prepare_dataset(
            [str(jsonl_corpus(tmp_path / "corpus.jsonl", 10))],
            f"s3://{bucket}/ds",
            f"wordpiece:{DEFAULT_VOCAB}",
            storage_options=s3_server.storage_options,
            progress_stream=io.StringIO(),
        )
    fs.invalidate_cache()
    assert not fs.exists(bucket)
