"""launch/prepare_data.py as a real process on local files: the WordPiece dataset matches the ELECTRA
tokenizer and its index; progress is plain lines off a terminal."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from dsexit.data import DatasetIndex, read_validation_samples, save_hf_tokenizer
from dsexit.data.packing import token_type_ids
from dsexit.data.prepare import is_validation_document
from tests.helpers import REPO
from tests.helpers.datasets import moby_sample, shared_file  # noqa: F401  (moby_sample: a fixture)

SCRIPT = REPO / "launch" / "prepare_data.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_wordpiece_dataset_matches_the_electra_tokenizer_and_its_index(moby_sample, tmp_path):
    folder, documents = moby_sample
    vocab = shared_file("tokenizer/bert-base-uncased-vocab.txt")
    out = tmp_path / "ds"
    result = _run(
        "--input", folder / "*.jsonl.gz", "--out", out, "--tokenizer", f"wordpiece:{vocab}", "--shard-mb", "0.02"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # off a terminal, progress is plain lines, not a redrawn bar
    assert lines and "\r" not in result.stderr and all(line.startswith("prepare_data: ") for line in lines)

    index = DatasetIndex.load(str(out))
    assert (index.seq_len, index.dtype, index.vocab_size) == (128, "uint16", 30522)
    assert index.special_tokens == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert len(index.shards) > 3 and (out / "vocab.txt").read_bytes() == vocab.read_bytes()
    assert [s.name for s in index.validation_shards] == ["validation-00000.bin"]  # the default fraction, 0.02
    for shard in index.shards + index.validation_shards:
        data = (out / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.num_samples * 256

    # The packed tokens are exactly the Hugging Face ELECTRA tokenizer's tokens of the text, in order,
    # each document on the side of the split its (seed, number) draw puts it.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(save_hf_tokenizer(index, str(tmp_path / "hf")))
    held_out = [is_validation_document(0, number, 0.02) for number in range(len(documents))]
    sides = {
        False: np.concatenate([np.fromfile(out / s.name, dtype="<u2").reshape(-1, 128) for s in index.shards]),
        True: read_validation_samples(index),
    }
    for validation, rows in sides.items():
        packed = [int(t) for t in rows.ravel() if t not in (0, 101, 102)]
        expected = [
            t
            for d, side in zip(documents, held_out)
            if side == validation
            for t in hf(d, add_special_tokens=False)["input_ids"]
        ]
        assert packed == expected and expected
    # Hugging Face's pair encoding has the segment ids the reader derives from the ids.
    pair = hf("Call me Ishmael.", "Some years ago.")
    assert pair["token_type_ids"] == token_type_ids(np.array(pair["input_ids"]), 102, 0).tolist()
    assert 0 < sum(pair["token_type_ids"]) < len(pair["input_ids"]) - 2


@pytest.mark.parametrize(
    "kind, content",
    [("spm", b"a text file, not a SentencePiece model\n"), ("wordpiece", bytes(range(128, 256)) * 8)],
)
def test_an_unreadable_tokenizer_file_is_one_line_naming_it_and_nothing_is_written(
    moby_sample, tmp_path, kind, content
):
    folder, _ = moby_sample
    bad = tmp_path / f"bad.{kind}"
    bad.write_bytes(content)
    out = tmp_path / "ds"
    result = _run("--input", folder / "*.jsonl.gz", "--out", out, "--tokenizer", f"{kind}:{bad}")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "Traceback" in line or str(bad) in line]
    assert len(errors) == 1 and "Traceback" not in errors[0], result.stderr
    assert not out.exists()


def test_credentials_in_urls_are_masked_in_the_one_error_line(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("The whale swam past the ship at dawn.\n")
    # an output URL that carries credentials (s3:// URLs never may), and an input that matches nothing
    for args in (
        ["--input", text, "--out", "s3://AKIAEXAMPLEKEY:wJalrSECRETkey@bucket/x"],
        ["--input", "memory://AKIAEXAMPLEKEY:wJalrSECRETkey@bucket/none.txt", "--out", tmp_path / "ds"],
    ):
        result = _run(*args)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("prepare_data: error: ") and "***" in line, line
        assert "wJalrSECRETkey" not in result.stderr and "AKIAEXAMPLEKEY" not in result.stderr
    assert not (tmp_path / "ds").exists()
