"""Synthetic datasets for the data tests (unit and integration), and the shared test data.

Synthetic datasets carry each sample's global number in tokens 1 and 2 of its row,
so a test can say exactly which samples a batch holds without trusting the reader.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from dsexit.data import DEFAULT_DATA_URL
from dsexit.data.tokenizer import TextTokenizer
from dsexit.data.writer import ShardWriter, StagedOutput
from tests.helpers import SHARED_DATA

DEFAULT_VOCAB = os.path.join(DEFAULT_DATA_URL, "vocab.txt")  # ELECTRA's WordPiece vocabulary
_ID_BASE = 5  # keeps the encoded ids clear of [PAD]=0


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (it lives beside the checkout in ../shared/data)")
    return path


def encode_sample_number(number: int, seq_len: int) -> list[int]:
    row = [101, _ID_BASE + number // 1000, _ID_BASE + number % 1000, 102]
    return row + [0] * (seq_len - len(row))


def decode_sample_numbers(input_ids) -> list[int]:
    return [int(row[1] - _ID_BASE) * 1000 + int(row[2] - _ID_BASE) for row in input_ids]


def write_synthetic_dataset(url: str, num_samples: int, rows_per_shard: int, seq_len: int = 16, storage_options=None):
    """A dataset whose sample n is `[CLS] n//1000 n%1000 [SEP] [PAD]...` (offset by _ID_BASE)."""
    tokenizer = TextTokenizer(
        "wordpiece",
        os.path.join(DEFAULT_DATA_URL, "vocab.txt"),
        30522,
        {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103},
    )
    row_bytes = seq_len * 2
    with StagedOutput(url, overwrite=True, storage_options=storage_options) as output:
        writer = ShardWriter(output.staging_url, tokenizer, seq_len, rows_per_shard * row_bytes, storage_options)
        writer.add_rows([encode_sample_number(n, seq_len) for n in range(num_samples)])
        return output.publish(writer.finish())


def one_error_line(capsys) -> str:
    """The single `prepare_data: error:` line a CLI call printed to stderr (fails if there are more or none)."""
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("prepare_data: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def moby_sample(tmp_path_factory):
    """The first 300 paragraphs of Moby-Dick as JSON Lines (gzip) and as plain text."""
    folder = tmp_path_factory.mktemp("text")
    with gzip.open(shared_file("corpus/moby_dick.jsonl.gz"), "rt") as source:
        documents = [json.loads(line)["text"] for _, line in zip(range(300), source)]
    with gzip.open(folder / "moby.jsonl.gz", "wt") as out:
        out.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    (folder / "moby.txt").write_text("\n\n".join(documents) + "\n")
    return folder, documents


SENTENCES = [
    "The whale swam past the ship at dawn.",
    "Every sailor on the deck watched it go.",
    "The captain said nothing for a long time.",
    "Then the wind turned and the sails filled.",
]


def jsonl_corpus(path: Path, documents: int, bad_line: int | None = None) -> Path:
    """`documents` JSON Lines of four sentences each; line `bad_line` (1-based) is broken JSON."""
    with open(path, "w") as out:
        for number in range(1, documents + 1):
            text = " ".join(SENTENCES[(number + k) % 4] for k in range(4))
            out.write("{oops\n" if number == bad_line else json.dumps({"text": f"Document {number}. {text}"}) + "\n")
    return path
