"""The held-out validation split: written by prepare_data, never streamed for training, read back verified.

The corpus is synthetic: document i puts its own marker word (one WordPiece id)
at the start of every sentence, so each packed row names the one document it
came from and a test can tell which side of the split every document landed on.
"""

import io
import json
import os
import random
import shutil

import numpy as np
import pytest

from dsexit.commands.prepare_data import main as prepare_main  # the CLI in-process
from dsexit.data import (
    DEFAULT_DATA_URL,
    DatasetFormatError,
    DatasetIndex,
    ShardCorruptError,
    StreamingShardReader,
    read_validation_samples,
)
from dsexit.data.prepare import is_validation_document, prepare_dataset

VOCAB = os.path.join(DEFAULT_DATA_URL, "vocab.txt")
NUM_DOCUMENTS, FRACTION, SEED = 600, 0.1, 0
FILLER = "the sea ship and a of to in was it he his with on that for as whale boat".split()


@pytest.fixture(scope="module")
def vocab_ids():
    with open(VOCAB, encoding="utf-8") as handle:
        return {line.rstrip("\n"): number for number, line in enumerate(handle)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, vocab_ids):
    """(jsonl path, marker word of each document): 1-6 sentences a document, each starting with its marker."""
    words = [
        word
        for word, number in vocab_ids.items()
        if number >= 3000 and word.isascii() and word.isalpha() and len(word) >= 4 and word not in FILLER
    ]
    markers = words[:NUM_DOCUMENTS]
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("corpus") / "documents.jsonl"
    with open(path, "w") as out:
        for marker in markers:
            sentences = [
                " ".join([marker] + rng.choices(FILLER, k=rng.randint(4, 9))) + "." for _ in range(rng.randint(1, 6))
            ]
            out.write(json.dumps({"text": "\n".join(sentences)}) + "\n")
    return path, markers


def _prepare(corpus_path, out, seed=SEED, fraction=FRACTION, progress=None):
    return prepare_dataset(
        [str(corpus_path)],
        str(out),
        f"wordpiece:{VOCAB}",
        seq_len=32,
        shard_mb=0.004,
        seed=seed,
        validation_fraction=fraction,
        progress_stream=progress or io.StringIO(),
    )


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return _prepare(corpus[0], out), out


def _documents_of_rows(rows, marker_of_id):
    """The document (marker word) each row holds; asserts every row holds exactly one."""
    documents = []
    for row in rows:
        found = {marker_of_id[int(token)] for token in row if int(token) in marker_of_id}
        assert len(found) == 1, f"a row holds {len(found)} documents: {found}"
        documents.append(found.pop())
    return documents


def _all_training_rows(url, index):
    """One full epoch through the training reader: a single global batch holding every sample."""
    with StreamingShardReader(
        str(url), global_batch_size=index.num_samples, micro_batch_size=index.num_samples, prefetch=0
    ) as reader:
        assert reader.steps_per_epoch == 1
        return next(reader)["input_ids"].numpy()


def test_held_out_documents_are_never_in_a_training_sample(corpus, prepared, vocab_ids):
    _, markers = corpus
    index, url = prepared
    marker_of_id = {vocab_ids[marker]: marker for marker in markers}
    assert len(index.shards) > 1 and len(index.validation_shards) > 1

    training = _documents_of_rows(_all_training_rows(url, index), marker_of_id)
    validation = _documents_of_rows(read_validation_samples(index), marker_of_id)
    assert len(training) == index.num_samples and len(validation) == index.num_validation_samples
    assert set(training).isdisjoint(validation)
    assert set(training) | set(validation) == set(markers)  # every document is on one side, none lost
    expected = {marker for number, marker in enumerate(markers) if is_validation_document(SEED, number, FRACTION)}
    assert set(validation) == expected
    assert abs(len(expected) / NUM_DOCUMENTS - FRACTION) < 0.04


def test_validation_rows_are_the_shards_in_file_order(prepared):
    index, url = prepared
    on_disk = np.concatenate(
        [np.fromfile(url / shard.name, dtype="<u2").reshape(-1, 32) for shard in index.validation_shards]
    )
    rows = read_validation_samples(index)
    assert rows.dtype == np.int64 and rows.shape == (index.num_validation_samples, 32)
    assert np.array_equal(rows, on_disk)
    assert np.array_equal(read_validation_samples(str(url), max_samples=70), on_disk[:70])  # spans two shards
    assert read_validation_samples(index, max_samples=0).shape == (0, 32)
    assert set(rows[:, 0].tolist()) == {index.special_tokens["cls"]}


def test_the_same_seed_gives_the_same_split_and_another_seed_another(corpus, prepared, tmp_path):
    index, _ = prepared
    again = _prepare(corpus[0], tmp_path / "again")
    assert again.to_json() == index.to_json()  # every shard's sha256, training and validation
    other = _prepare(corpus[0], tmp_path / "other", seed=SEED + 1)
    assert [s.sha256 for s in other.validation_shards] != [s.sha256 for s in index.validation_shards]
    assert other.fingerprint != index.fingerprint


def test_a_tiny_corpus_still_holds_out_one_document(tmp_path, vocab_ids):
    seed = next(s for s in range(100) if not any(is_validation_document(s, n, 0.01) for n in range(3)))
    path = tmp_path / "three.txt"
    path.write_text("apple pie here.\n\nbanana split there.\n\ncherry tart everywhere.\n")
    progress = io.StringIO()
    index = _prepare(path, tmp_path / "ds", seed=seed, fraction=0.01, progress=progress)
    assert "holding out the last document" in progress.getvalue()
    (validation_row,) = read_validation_samples(index)
    assert vocab_ids["cherry"] in validation_row.tolist()
    assert index.num_samples == 2

    single = tmp_path / "one.txt"
    single.write_text("only one document here.\n")
    alone = _prepare(single, tmp_path / "alone", seed=seed, fraction=0.01)
    assert alone.validation_shards == [] and alone.num_samples == 1


def test_an_index_without_the_validation_key_loads_with_no_split(prepared, tmp_path):
    index, url = prepared
    old = tmp_path / "old"
    shutil.copytree(url, old)
    body = json.loads((old / "index.json").read_text())
    del body["validation"]
    (old / "index.json").write_text(json.dumps(body))

    loaded = DatasetIndex.load(str(old))
    assert loaded.validation_shards == [] and loaded.num_validation_samples == 0
    assert (loaded.num_samples, loaded.fingerprint) == (index.num_samples, index.fingerprint)
    assert "validation" not in json.loads(loaded.to_json())
    with pytest.raises(DatasetFormatError) as error:
        read_validation_samples(loaded)
    message = str(error.value)
    assert "\n" not in message and f"dataset at {old} has no validation split" in message
    assert "--validation-fraction" in message


def test_fraction_zero_writes_no_validation_key(corpus, tmp_path):
    index = _prepare(corpus[0], tmp_path / "ds", fraction=0)
    assert index.validation_shards == [] and "validation" not in json.loads(
        (tmp_path / "ds" / "index.json").read_text()
    )
    assert not any(name.startswith("validation-") for name in os.listdir(tmp_path / "ds"))


def test_a_flipped_byte_in_a_validation_shard_is_caught_and_training_never_reads_it(prepared, tmp_path):
    index, url = prepared
    copy = tmp_path / "ds"
    shutil.copytree(url, copy)
    corrupt = index.validation_shards[1]
    with open(copy / corrupt.name, "r+b") as shard:
        shard.seek(11)
        byte = shard.read(1)
        shard.seek(11)
        shard.write(bytes([byte[0] ^ 0xFF]))
    loaded = DatasetIndex.load(str(copy))
    with pytest.raises(ShardCorruptError, match=corrupt.sha256) as error:
        read_validation_samples(loaded, cache_dir=str(tmp_path / "cache"))
    assert str(copy / corrupt.name) in str(error.value)
    # Rows before the corrupt shard do not need it; the training reader never opens a validation shard.
    assert len(read_validation_samples(loaded, max_samples=index.validation_shards[0].num_samples)) > 0
    assert len(_all_training_rows(copy, loaded)) == index.num_samples


@pytest.mark.parametrize("value", ["0.5", "-0.1", "1", "nan"])
def test_a_bad_validation_fraction_is_one_error_line_naming_it(corpus, tmp_path, capsys, value):
    out = tmp_path / "out"
    returncode = prepare_main(
        [
            "--input",
            str(corpus[0]),
            "--out",
            str(out),
            "--tokenizer",
            f"wordpiece:{VOCAB}",
            "--validation-fraction",
            value,
        ]
    )
    stderr = capsys.readouterr().err
    assert returncode == 2
    assert stderr.splitlines() == [
        f"prepare_data: error: --validation-fraction must be in [0, 0.5), got {float(value)}."
    ]
    assert not out.exists()  # refused before any work
