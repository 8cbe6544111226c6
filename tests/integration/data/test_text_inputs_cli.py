"""launch/prepare_data.py as a real process on input that is not text, and its memory on huge lines."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dsexit.data import DatasetIndex
from tests.helpers import REPO
from tests.helpers.datasets import DEFAULT_VOCAB

SCRIPT = REPO / "launch" / "prepare_data.py"
WORDS = "the sea ship and a of to in was it he his with on that for as whale boat captain".split()


@pytest.mark.parametrize(
    "kind, encoding, expected",
    [
        ("random", "utf-8", "NUL"),  # the one line names the file and what gave it away
        ("random", "latin-1", "NUL"),
        ("controls", "latin-1", "control characters"),
        ("utf16", "utf-8", "--encoding utf-16"),  # and the flag that reads it
    ],
)
def test_binary_input_exits_2_with_one_line_and_writes_nothing(tmp_path, kind, encoding, expected):
    path = tmp_path / "garbage.txt"
    path.write_bytes(_garbage(kind))
    out = tmp_path / "ds"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--input",
            str(path),
            "--out",
            str(out),
            "--tokenizer",
            "train:1000",
            "--encoding",
            encoding,
            "--undecodable",
            "skip",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("prepare_data: error:"), result.stderr
    assert str(path) in result.stderr
    assert expected in result.stderr and not out.exists()


_MEASURE = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from prepare_data import main
code = main(sys.argv[2:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_memory_is_bounded_whatever_the_line_length(tmp_path):
    """An 8 MB single line costs tens of MB beyond a tiny input, not the ~1.3 GB its length once cost."""
    (tmp_path / "small.txt").write_text("Call me Ishmael. Some years ago.\n\nAnother document.\n")
    rng = random.Random(0)
    with open(tmp_path / "long.txt", "w") as out:
        for _ in range(8):
            out.write(" ".join(rng.choices(WORDS, k=250_000)) + " ")  # ~1 MB a write, no newline: one 8 MB line
        out.write("\n")
    line_bytes = (tmp_path / "long.txt").stat().st_size
    baseline = _peak_rss(tmp_path, tmp_path / "small.txt", "small")
    peak = _peak_rss(tmp_path, tmp_path / "long.txt", "long")
    # Measured: ~+40 MB (the tokenizer's working set plus ~45 bytes a character of one 256k piece).
    bound = 128 << 20
    assert line_bytes > 8_000_000 and peak - baseline < bound, f"{(peak - baseline) >> 20} MB over the baseline"
    assert DatasetIndex.load(str(tmp_path / "long")).num_tokens > 1_500_000


def _garbage(kind: str) -> bytes:
    rng = random.Random(7)
    if kind == "random":
        return rng.randbytes(300_000)
    if kind == "controls":  # no NUL, but mostly control characters
        return bytes(rng.choice([*range(1, 9), *range(14, 32), *b"abc de"]) for _ in range(20_000))
    return "A UTF-16 document.\n".encode("utf-16") * 100  # "utf16": NUL bytes read as utf-8


def _peak_rss(tmp_path, text_path: Path, name: str) -> int:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            str(SCRIPT.parent),
            "--input",
            str(text_path),
            "--out",
            str(tmp_path / name),
            "--tokenizer",
            f"wordpiece:{DEFAULT_VOCAB}",
            "--validation-fraction",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"},
    )
    code, peak = result.stdout.split()[-2:]
    assert code == "0", result.stderr
    return int(peak)
