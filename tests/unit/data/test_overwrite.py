"""prepare_data never deletes what it did not write (issue 12, item 1), on local disk.

Each case is a reproduction from the issue: the input inside --out, the vocabulary inside
--out, bad JSON at line 3001 of an input. "Untouched" is checked byte for byte over every
file. The same on a real S3 server: tests/integration/data/test_overwrite_s3.py.
"""

import json
from pathlib import Path

import pytest

from dsexit.commands.prepare_data import main as prepare_main  # the CLI in-process
from dsexit.data import DatasetIndex, StreamingShardReader, writer
from dsexit.data.writer import STAGING_PREFIX, listed_files
from tests.helpers.datasets import DEFAULT_VOCAB, jsonl_corpus, one_error_line


def _args(inputs, out, *extra, tokenizer=f"wordpiece:{DEFAULT_VOCAB}"):
    return [
        "--input",
        *map(str, inputs),
        "--out",
        str(out),
        "--tokenizer",
        tokenizer,
        "--seq-len",
        "32",
        "--shard-mb",
        "0.01",
        *extra,
    ]


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
    corpus = jsonl_corpus(userdir / "corpus.jsonl", 50)
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
    corpus = jsonl_corpus(tmp_path / "corpus.jsonl", 60)
    out = tmp_path / "ds"
    assert prepare_main(_args([corpus], out)) == 0
    first = DatasetIndex.load(str(out))
    assert (
        prepare_main(_args([corpus], out, "--overwrite", "--seed", "1", tokenizer=f"wordpiece:{out / 'vocab.txt'}"))
        == 0
    )
    assert (out / "vocab.txt").read_bytes() == Path(DEFAULT_VOCAB).read_bytes()
    second = _assert_is_exactly_a_dataset(out)
    assert second.vocab_size == first.vocab_size and second.fingerprint != first.fingerprint  # seed 1 packs differently


def test_bad_json_at_line_3001_leaves_the_old_dataset_byte_identical(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    assert prepare_main(_args([jsonl_corpus(tmp_path / "good.jsonl", 40)], out)) == 0
    before = _snapshot(out)
    staged_at_failure = []
    discard = writer.StagedOutput._discard
    monkeypatch.setattr(
        writer.StagedOutput,
        "_discard",
        lambda self: (staged_at_failure.extend(p.name for p in Path(self._staging_path).glob("*")), discard(self)),
    )
    bad = jsonl_corpus(tmp_path / "bad.jsonl", 3001, bad_line=3001)
    capsys.readouterr()
    assert prepare_main(_args([bad], out, "--overwrite")) == 2
    assert f"{bad} line 3001 is not valid JSON" in one_error_line(capsys)
    assert "shard-00005.bin" in staged_at_failure  # the first 3000 documents were written, into staging
    assert _snapshot(out) == before  # and the staging prefix is gone


def test_a_failure_into_a_new_location_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "new" / "ds"
    assert prepare_main(_args([jsonl_corpus(tmp_path / "bad.jsonl", 200, bad_line=150)], out)) == 2
    assert "line 150 is not valid JSON" in one_error_line(capsys)
    assert not out.exists()


def test_files_the_index_does_not_list_are_refused_with_or_without_overwrite(tmp_path, capsys):
    corpus = jsonl_corpus(tmp_path / "corpus.jsonl", 40)
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
    corpus = jsonl_corpus(tmp_path / "corpus.jsonl", 400)
    out = tmp_path / "ds"
    (tmp_path / "beside.txt").write_text("a file next to the dataset\n")
    assert prepare_main(_args([corpus], out, "--validation-fraction", "0.1")) == 0
    old = DatasetIndex.load(str(out))
    assert len(old.shards) > 3 and old.validation_shards
    before = _snapshot(out)
    capsys.readouterr()
    assert prepare_main(_args([jsonl_corpus(tmp_path / "small.jsonl", 20)], out, "--validation-fraction", "0")) == 2
    message = one_error_line(capsys)
    assert message.endswith(
        f"--out {out} already holds a dsexit dataset; --overwrite replaces it (only the files its index.json lists)."
    )
    assert _snapshot(out) == before
    assert prepare_main(_args([tmp_path / "small.jsonl"], out, "--validation-fraction", "0", "--overwrite")) == 0
    new = _assert_is_exactly_a_dataset(out)  # the old shards and validation-*.bin it no longer lists are gone
    assert len(new.shards) < len(old.shards) and not new.validation_shards
    assert (tmp_path / "beside.txt").read_text() == "a file next to the dataset\n"


def test_out_that_is_a_file_or_a_foreign_index_is_refused(tmp_path, capsys):
    corpus = jsonl_corpus(tmp_path / "corpus.jsonl", 20)
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
    corpus = jsonl_corpus(tmp_path / "corpus.jsonl", 40)
    out = tmp_path / "ds"
    assert prepare_main(_args([corpus], out)) == 0
    leftover = out / f"{STAGING_PREFIX}0123456789ab"
    leftover.mkdir()
    (leftover / "shard-00000.bin").write_bytes(b"half written")
    assert prepare_main(_args([corpus], out, "--overwrite", "--seed", "2")) == 0
    assert (leftover / "shard-00000.bin").read_bytes() == b"half written"
    assert {p.name for p in out.iterdir()} == listed_files(DatasetIndex.load(str(out))) | {leftover.name}


# ---- the same on a real S3 server (moto_server on 127.0.0.1) ----------------------------------
