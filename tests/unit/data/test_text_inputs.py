"""prepare_data refuses what is not text (issue 12, item 8): --encoding, undecodable input, chunked reading.
Binary input and bounded memory, through the CLI as a real process: tests/integration/data/test_text_inputs_cli.py."""

import io
import os
import random

import numpy as np
import pytest

from dsexit.commands.prepare_data import main as prepare_main  # the CLI in-process
from dsexit.data import DEFAULT_DATA_URL, sources
from dsexit.data.prepare import prepare_dataset
from dsexit.data.sources import TextSource, split_sentences
from tests.helpers.datasets import one_error_line

VOCAB = os.path.join(DEFAULT_DATA_URL, "vocab.txt")
WORDS = "the sea ship and a of to in was it he his with on that for as whale boat captain".split()
ACCENTED = "Café naïve résumé"


def _accented_corpus(rng: random.Random) -> str:
    """Documents of varied words with the accented phrase in every sentence: enough text to train SentencePiece."""
    with open(VOCAB, encoding="utf-8") as handle:
        words = [word for word in handle.read().split()[2000:8000] if word.isascii() and word.isalpha()]
    documents = []
    for _ in range(150):
        sentences = [f"{ACCENTED} {' '.join(rng.choices(words, k=12))}." for _ in range(3)]
        documents.append("\n".join(sentences))
    return "\n\n".join(documents) + "\n"


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16"])
def test_encoding_keeps_accented_letters(tmp_path, encoding):
    import sentencepiece

    path = tmp_path / "corpus.txt"
    path.write_bytes(_accented_corpus(random.Random(0)).encode(encoding))
    index = prepare_dataset(
        [str(path)],
        str(tmp_path / "ds"),
        "train:120",
        seq_len=64,
        encoding=encoding,
        validation_fraction=0,
        progress_stream=io.StringIO(),
    )
    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "ds" / "tokenizer.model"))
    rows = np.fromfile(tmp_path / "ds" / index.shards[0].name, dtype="<u2").reshape(-1, 64)
    special = set(index.special_tokens.values())
    text = spm.decode([int(t) for t in rows[0] if t not in special])
    assert text.startswith(ACCENTED), text


def test_latin1_without_encoding_is_one_line_naming_file_and_byte_offset(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    data = f"A plain first line.\nThen {ACCENTED} here.\n".encode("latin-1")
    path.write_bytes(data)
    out = tmp_path / "ds"
    assert prepare_main(["--input", str(path), "--out", str(out), "--tokenizer", f"wordpiece:{VOCAB}"]) == 2
    message = one_error_line(capsys)
    offset = data.index("é".encode("latin-1"))
    assert str(path) in message and f"offset {offset}" in message and "line 2" in message  # where it is
    assert "--encoding" in message and not out.exists()  # and the flag that reads it


def test_undecodable_lines_can_be_skipped_and_are_counted(tmp_path, capsys):
    path = tmp_path / "mixed.txt"
    path.write_bytes(
        b"The first line is fine.\nThis one is caf\xe9 in latin-1.\nThe third line is fine.\n\n"
        b"Another document.\nWith a bad \xff byte.\n"
    )
    out = tmp_path / "ds"
    args = ["--input", str(path), "--out", str(out), "--tokenizer", f"wordpiece:{VOCAB}", "--validation-fraction", "0"]
    assert prepare_main(args + ["--undecodable", "skip"]) == 0
    assert f"{path} line 2" in capsys.readouterr().err  # the report names the first skipped line
    documents = list(TextSource(str(path), "text", undecodable="skip").documents())
    assert [split_sentences(text) for text, _ in documents] == [
        ["The first line is fine.", "The third line is fine."],
        ["Another document."],
    ]


def test_unknown_encoding_and_broken_compression_are_one_line(tmp_path, capsys):
    path = tmp_path / "a.txt"
    path.write_text("text\n")
    assert prepare_main(["--input", str(path), "--out", str(tmp_path / "ds"), "--encoding", "klingon"]) == 2
    assert "'klingon'" in one_error_line(capsys)
    (tmp_path / "b.txt.gz").write_bytes(b"not gzip data")
    assert (
        prepare_main(
            ["--input", str(tmp_path / "b.txt.gz"), "--out", str(tmp_path / "ds"), "--tokenizer", f"wordpiece:{VOCAB}"]
        )
        == 2
    )
    assert str(tmp_path / "b.txt.gz") in one_error_line(capsys)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 64])
def test_chunked_reading_splits_nothing_it_should_not(tmp_path, monkeypatch, chunk_bytes):
    """Chunk ends inside a multi-byte character, inside \\r\\n and inside long lines change no document."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 16)
    lines = [
        "Café 日本 naïve line one",
        "line two\r",
        "   ",
        "",
        "second document with a longer line than sixteen",
        "tail",
        "",
        "",
        "x" * 40,
        "€",
    ]
    path = tmp_path / "tricky.txt"
    path.write_bytes("\n".join(lines).encode("utf-8"))
    documents = []
    for text, continues in TextSource(str(path), "text").documents():
        assert len(text) <= 16 + 1
        if continues:
            documents[-1] += text
        else:
            documents.append(text)
    assert documents == [
        "Café 日本 naïve line one\nline two\n",
        "second document with a longer line than sixteen\ntail\n",
        "x" * 40 + "\n€\n",
    ]


def test_a_line_longer_than_every_buffer_keeps_every_token(tmp_path):
    """One 600k-character line: read, cut into pieces and tokenized in parts, it packs to the tokens of the
    whole line."""
    from transformers import AutoTokenizer

    from dsexit.data.tokenizer import save_hf_tokenizer

    rng = random.Random(3)
    line = " ".join(rng.choices(WORDS + ["Ishmael", "harpooneer", "leviathan"], k=110_000))
    assert len(line) > sources.MAX_PIECE_CHARS
    (tmp_path / "long.txt").write_text(line + "\n")
    index = prepare_dataset(
        [str(tmp_path / "long.txt")],
        str(tmp_path / "ds"),
        f"wordpiece:{VOCAB}",
        seq_len=128,
        validation_fraction=0,
        progress_stream=io.StringIO(),
    )
    rows = np.concatenate([np.fromfile(tmp_path / "ds" / s.name, dtype="<u2") for s in index.shards])
    hf = AutoTokenizer.from_pretrained(save_hf_tokenizer(index, str(tmp_path / "hf")))
    assert [int(t) for t in rows if t not in (0, 101, 102)] == hf(line, add_special_tokens=False)["input_ids"]
