"""prepare_data never deletes what it did not write (issue 12, item 1), on local disk and on a real S3 server.

Each case is a reproduction from the issue: the input inside --out, the vocabulary
inside --out, bad JSON at line 3001 of an input, and --out naming a bucket that holds
unrelated objects. "Untouched" is checked byte for byte over every file or object.
"""

import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from dsexit.data import DEFAULT_DATA_URL, DatasetIndex, StreamingShardReader
from dsexit.data import writer
from dsexit.data.prepare import prepare_dataset
from dsexit.data.writer import STAGING_PREFIX, OutputRefusedError, listed_files

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "prepare_data.py"
sys.path.insert(0, str(SCRIPT.parent))
from prepare_data import main as prepare_main  # noqa: E402  (the CLI in-process, for the local cases)

from .conftest import one_error_line  # noqa: E402

VOCAB = os.path.join(DEFAULT_DATA_URL, "vocab.txt")
SENTENCES = ["The whale swam past the ship at dawn.", "Every sailor on the deck watched it go.",
             "The captain said nothing for a long time.", "Then the wind turned and the sails filled."]


def _jsonl(path: Path, documents: int, bad_line: int | None = None) -> Path:
    """`documents` JSON Lines of four sentences each; line `bad_line` (1-based) is broken JSON."""
    with open(path, "w") as out:
        for number in range(1, documents + 1):
            text = " ".join(SENTENCES[(number + k) % 4] for k in range(4))
            out.write("{oops\n" if number == bad_line else json.dumps({"text": f"Document {number}. {text}"}) + "\n")
    return path


def _args(inputs, out, *extra, tokenizer=f"wordpiece:{VOCAB}"):
    return ["--input", *map(str, inputs), "--out", str(out), "--tokenizer", tokenizer, "--seq-len", "32",
            "--shard-mb", "0.01", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _assert_is_exactly_a_dataset(folder: Path) -> DatasetIndex:
    """Every file is one the index lists, each shard hashes right, no staging prefix is left."""
    index = DatasetIndex.load(str(folder))
    assert {p.name for p in folder.iterdir()} == listed_files(index)
    with StreamingShardReader(str(folder), global_batch_size=4, micro_batch_size=4) as reader:
        next(reader)  # verifies the sha256 of the shard it reads
    return index


@pytest.mark.parametrize("overwrite", [True, False])
def test_input_inside_out_is_refused_and_nothing_there_changes(tmp_path, capsys, overwrite):
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    corpus = _jsonl(userdir / "corpus.jsonl", 50)
    (userdir / "notes.md").write_text("my notes\n")
    (userdir / "drafts").mkdir()
    (userdir / "drafts" / "a.txt").write_text("draft\n")
    before = _snapshot(userdir)
    assert prepare_main(_args([corpus], userdir, *(["--overwrite"] if overwrite else []))) == 2
    message = one_error_line(capsys)
    assert f"--out {userdir} holds files that prepare_data did not write" in message and "corpus.jsonl" in message
    assert "a dataset" not in message.lower() and "with or without --overwrite" in message
    assert _snapshot(userdir) == before and not list(userdir.glob(f"{STAGING_PREFIX}*"))


def test_vocab_inside_out_is_read_before_the_dataset_is_replaced(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl", 60)
    out = tmp_path / "ds"
    assert prepare_main(_args([corpus], out)) == 0
    first = DatasetIndex.load(str(out))
    assert prepare_main(_args([corpus], out, "--overwrite", "--seed", "1", tokenizer=f"wordpiece:{out / 'vocab.txt'}")) == 0
    assert (out / "vocab.txt").read_bytes() == Path(VOCAB).read_bytes()
    second = _assert_is_exactly_a_dataset(out)
    assert second.vocab_size == first.vocab_size and second.fingerprint != first.fingerprint  # seed 1 packs differently


def test_bad_json_at_line_3001_leaves_the_old_dataset_byte_identical(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    assert prepare_main(_args([_jsonl(tmp_path / "good.jsonl", 40)], out)) == 0
    before = _snapshot(out)
    staged_at_failure = []
    discard = writer.StagedOutput._discard
    monkeypatch.setattr(writer.StagedOutput, "_discard", lambda self: (
        staged_at_failure.extend(p.name for p in Path(self._staging_path).glob("*")), discard(self)))
    bad = _jsonl(tmp_path / "bad.jsonl", 3001, bad_line=3001)
    capsys.readouterr()
    assert prepare_main(_args([bad], out, "--overwrite")) == 2
    assert f"{bad} line 3001 is not valid JSON" in one_error_line(capsys)
    assert "shard-00005.bin" in staged_at_failure  # the first 3000 documents were written, into staging
    assert _snapshot(out) == before  # and the staging prefix is gone


def test_a_failure_into_a_new_location_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "new" / "ds"
    assert prepare_main(_args([_jsonl(tmp_path / "bad.jsonl", 200, bad_line=150)], out)) == 2
    assert "line 150 is not valid JSON" in one_error_line(capsys)
    assert not out.exists()


def test_files_the_index_does_not_list_are_refused_with_or_without_overwrite(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl", 40)
    out = tmp_path / "ds"
    assert prepare_main(_args([corpus], out)) == 0
    (out / "README.txt").write_text("what this dataset is\n")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert prepare_main(_args([corpus], out, *extra)) == 2
        message = one_error_line(capsys)
        assert f"--out {out}" in message and "README.txt" in message and "does not list" in message
        assert _snapshot(out) == before


def test_a_previous_dataset_needs_overwrite_which_replaces_exactly_its_listed_files(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl", 400)
    out = tmp_path / "ds"
    (tmp_path / "beside.txt").write_text("a file next to the dataset\n")
    assert prepare_main(_args([corpus], out, "--validation-fraction", "0.1")) == 0
    old = DatasetIndex.load(str(out))
    assert len(old.shards) > 3 and old.validation_shards
    before = _snapshot(out)
    capsys.readouterr()
    assert prepare_main(_args([_jsonl(tmp_path / "small.jsonl", 20)], out, "--validation-fraction", "0")) == 2
    message = one_error_line(capsys)
    assert message.endswith(f"--out {out} already holds a dsexit dataset; --overwrite replaces it (only the files its index.json lists).")
    assert _snapshot(out) == before
    assert prepare_main(_args([tmp_path / "small.jsonl"], out, "--validation-fraction", "0", "--overwrite")) == 0
    new = _assert_is_exactly_a_dataset(out)  # the old shards and validation-*.bin it no longer lists are gone
    assert len(new.shards) < len(old.shards) and not new.validation_shards
    assert (tmp_path / "beside.txt").read_text() == "a file next to the dataset\n"


def test_out_that_is_a_file_or_a_foreign_index_is_refused(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl", 20)
    afile = tmp_path / "file.bin"
    afile.write_bytes(b"keep me")
    assert prepare_main(_args([corpus], afile, "--overwrite")) == 2
    assert f"--out {afile} is a file" in one_error_line(capsys) and afile.read_bytes() == b"keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"format": "someone-else"}')
    assert prepare_main(_args([corpus], other, "--overwrite")) == 2
    message = one_error_line(capsys)
    assert f"--out {other} holds an index.json that prepare_data cannot read as its own" in message
    assert (other / "index.json").read_text() == '{"format": "someone-else"}'
    # An index that names a file outside its folder: replacing it would delete that file.
    assert prepare_main(_args([corpus], tmp_path / "ds")) == 0
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    index["tokenizer"]["file"] = "../file.bin"
    (tmp_path / "ds" / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert prepare_main(_args([corpus], tmp_path / "ds", "--overwrite")) == 2
    assert "lists files outside it (../file.bin)" in one_error_line(capsys) and afile.read_bytes() == b"keep me"


def test_a_staging_prefix_left_by_a_killed_run_is_neither_foreign_nor_deleted(tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", 40)
    out = tmp_path / "ds"
    assert prepare_main(_args([corpus], out)) == 0
    leftover = out / f"{STAGING_PREFIX}0123456789ab"
    leftover.mkdir()
    (leftover / "shard-00000.bin").write_bytes(b"half written")
    assert prepare_main(_args([corpus], out, "--overwrite", "--seed", "2")) == 0
    assert (leftover / "shard-00000.bin").read_bytes() == b"half written"
    assert {p.name for p in out.iterdir()} == listed_files(DatasetIndex.load(str(out))) | {leftover.name}


# ---- the same on a real S3 server (moto_server on 127.0.0.1) ----------------------------------


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
    fs.put_file(str(_jsonl(tmp_path / "corpus.jsonl", 30)), f"{bucket}/corpus.jsonl")  # the input, inside --out
    before = _s3_snapshot(fs, bucket)
    result = _cli(*_args([f"s3://{bucket}/corpus.jsonl"], f"s3://{bucket}", "--overwrite",
                         "--storage-options", json.dumps(s3_server.storage_options)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("prepare_data: error:"), result.stderr
    assert f"--out s3://{bucket} holds files that prepare_data did not write" in result.stderr
    assert "a dataset" not in result.stderr.lower()
    assert _s3_snapshot(fs, bucket) == before


def test_s3_failing_input_leaves_the_old_dataset_and_its_neighbours_byte_identical(s3_server, own_bucket, tmp_path):
    fs, bucket = own_bucket
    url = f"s3://{bucket}/ds"
    options = dict(seq_len=32, shard_mb=0.01, storage_options=s3_server.storage_options, progress_stream=io.StringIO())
    prepare_dataset([str(_jsonl(tmp_path / "good.jsonl", 400))], url, f"wordpiece:{VOCAB}", validation_fraction=0.1, **options)
    fs.pipe_file(f"{bucket}/ds-other/keep.txt", b"a sibling prefix that starts with the same letters")
    fs.pipe_file(f"{bucket}/ds.txt", b"a sibling object")
    before = _s3_snapshot(fs, bucket)

    bad = _jsonl(tmp_path / "bad.jsonl", 3001, bad_line=3001)
    with pytest.raises(ValueError, match="bad.jsonl line 3001 is not valid JSON"):
        prepare_dataset([str(bad)], url, f"wordpiece:{VOCAB}", overwrite=True, **options)
    assert _s3_snapshot(fs, bucket) == before  # no staging object is left either

    new = prepare_dataset([str(_jsonl(tmp_path / "small.jsonl", 20))], url, f"wordpiece:{VOCAB}", overwrite=True,
                          validation_fraction=0, **options)
    after = _s3_snapshot(fs, bucket)
    assert {key.removeprefix(f"{bucket}/ds/") for key in after if key.startswith(f"{bucket}/ds/")} == listed_files(new)
    assert {key: data for key, data in after.items() if not key.startswith(f"{bucket}/ds/")} == \
        {key: data for key, data in before.items() if not key.startswith(f"{bucket}/ds/")}
    assert DatasetIndex.load(url, s3_server.storage_options).to_json() == new.to_json()


def test_s3_output_in_a_missing_bucket_is_one_line_and_creates_no_bucket(s3_server, tmp_path):
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    bucket = f"dsexit-absent-{secrets.token_hex(4)}"
    with pytest.raises(OutputRefusedError, match=f"Cannot write to --out s3://{bucket}/ds"):
        prepare_dataset([str(_jsonl(tmp_path / "corpus.jsonl", 10))], f"s3://{bucket}/ds", f"wordpiece:{VOCAB}",
                        storage_options=s3_server.storage_options, progress_stream=io.StringIO())
    fs.invalidate_cache()
    assert not fs.exists(bucket)
