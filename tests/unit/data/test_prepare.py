"""prepare_data in process on local files: tokenizers, outputs, errors, progress.
The CLI as a real process: tests/integration/data/test_prepare_cli.py."""

import io
from pathlib import Path

import pytest

from dsexit.commands.prepare_data import main as prepare_main  # the CLI in-process
from dsexit.data import DEFAULT_DATA_URL, StreamingShardReader, save_hf_tokenizer
from dsexit.data.prepare import prepare_dataset
from tests.helpers.datasets import moby_sample  # noqa: F401  (a fixture)


def test_trained_sentencepiece_exports_a_tokenizer_that_loads_offline(moby_sample, tmp_path):
    folder, documents = moby_sample
    index = prepare_dataset(
        [str(folder / "moby.txt")], str(tmp_path / "ds"), "train:800", seq_len=64, progress_stream=io.StringIO()
    )
    assert index.tokenizer == {"kind": "sentencepiece", "file": "tokenizer.model"} and index.vocab_size == 800
    assert index.special_tokens == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

    import sentencepiece
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(save_hf_tokenizer(str(tmp_path / "ds"), str(tmp_path / "hf")))
    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "ds" / "tokenizer.model"))
    agree = sum(hf(d, add_special_tokens=False)["input_ids"] == spm.encode(d) for d in documents[:200])
    assert agree >= 198, f"HF export agrees with SentencePiece on only {agree}/200 paragraphs"
    pair = hf("Call me Ishmael.", "Some years ago.")
    assert pair["input_ids"][0] == 2 and pair["input_ids"].count(3) == 2 and pair["token_type_ids"][-1] == 1
    # The same text as plain text and as an hf: saved dataset gives the same samples.
    import datasets

    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(tmp_path / "saved"))
    again = prepare_dataset(
        [f"hf:{tmp_path / 'saved'}"],
        str(tmp_path / "ds2"),
        f"spm:{tmp_path / 'ds' / 'tokenizer.model'}",
        seq_len=64,
        progress_stream=io.StringIO(),
    )
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in index.shards]


def test_memory_url_output_streams_back(moby_sample):
    folder, _ = moby_sample
    index = prepare_dataset(
        [str(folder / "moby.jsonl.gz")],
        "memory://prepared/ds",
        "train:500",
        seq_len=32,
        shard_mb=0.01,
        overwrite=True,
        progress_stream=io.StringIO(),
    )
    with StreamingShardReader("memory://prepared/ds", global_batch_size=8, micro_batch_size=8) as reader:
        batch = next(reader)
    assert batch["input_ids"].shape == (8, 32) and int(batch["input_ids"][:, 0].unique()) == index.special_tokens["cls"]


def test_existing_dataset_is_kept_unless_overwrite(moby_sample, tmp_path, capsys):
    folder, _ = moby_sample
    out = tmp_path / "ds"
    vocab = Path(DEFAULT_DATA_URL) / "vocab.txt"
    args = [
        "--input",
        str(folder / "moby.txt"),
        "--out",
        str(out),
        "--tokenizer",
        f"wordpiece:{vocab}",
        "--seq-len",
        "32",
    ]
    assert prepare_main(args) == 0
    before = (out / "index.json").read_text()
    capsys.readouterr()
    assert prepare_main(args + ["--seed", "1"]) == 2
    refusal = capsys.readouterr().err
    assert refusal.count("\n") == 1 and str(out) in refusal and "--overwrite" in refusal  # the value and the way out
    assert (out / "index.json").read_text() == before
    assert prepare_main(args + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "index.json").read_text() != before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_match", "'{folder}/*.nothing'"),  # each one line names the bad value
        ("bad_json", "bad.jsonl line 2"),
        ("no_field", "'text'"),
        ("bad_spec", "'bpe:42'"),
        ("missing_vocab", "'{folder}/none.txt'"),
    ],
)
def test_bad_input_gives_one_clear_error_naming_the_value(tmp_path, capsys, case, expected):
    folder = tmp_path
    (folder / "ok.txt").write_text("Some text here.\n")
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n' if case == "bad_json" else '{"body": "x"}\n')
    inputs = {"no_match": f"{folder}/*.nothing", "bad_json": folder / "bad.jsonl", "no_field": folder / "bad.jsonl"}
    spec = {"bad_spec": "bpe:42", "missing_vocab": f"wordpiece:{folder}/none.txt"}.get(case, "train:100")
    returncode = prepare_main(
        ["--input", str(inputs.get(case, folder / "ok.txt")), "--out", str(folder / "out"), "--tokenizer", spec]
    )
    stderr = capsys.readouterr().err
    assert returncode == 2
    lines = [line for line in stderr.splitlines() if line.startswith("prepare_data: error:")]
    assert len(lines) == 1 and expected.format(folder=folder) in lines[0], stderr


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    from dsexit.data.prepare import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = Progress(4, stream, interval_s=3600)
        progress.update(1, 10, 20, 0)
        progress.message("a message while the bar is live")
        progress.update(4, 40, 80, 1, final=True)
    bar_states = terminal.getvalue().split("\r")  # tqdm redraws its line in place
    assert any(" 1/4 " in state and "10 docs 20 samples 0 shards" in state for state in bar_states)
    assert "\rprepare_data: a message while the bar is live\n" in terminal.getvalue()  # above the bar, not into it
    assert " 4/4 " in bar_states[-1] and "40 docs 80 samples 1 shards" in bar_states[-1]
    assert terminal.getvalue().endswith("\n")  # the final update closes the bar
    assert pipe.getvalue() == pipe.getvalue().replace("\r", "")
    assert pipe.getvalue().splitlines()[0] == "prepare_data: a message while the bar is live"
    assert len(pipe.getvalue().splitlines()) == 2  # interval not reached: only the final line
    assert pipe.getvalue().splitlines()[1].startswith("prepare_data: 4/4 inputs 40 docs 80 samples 1 shards")
