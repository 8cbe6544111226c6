"""User errors: one sentence naming the problem, raised before any training; CLI exits 2."""

import json
import re

import pytest

from dsexit.commands.finetune import main as finetune_main
from dsexit.eval.model_dir import ModelDirError, resolve_model_dir
from dsexit.eval.tasks import TaskError, load_task
from tests.helpers.tasks import write_jsonl

GOOD = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def make_task(tmp_path, train=GOOD, dev=GOOD, test=GOOD):
    for split, records in (("train", train), ("dev", dev), ("test", test)):
        if records is not None:
            write_jsonl(tmp_path / f"{split}.jsonl", records)
    return tmp_path


def test_valid_task_loads_with_pairs_and_arbitrary_int_labels(tmp_path):
    records = [{"text_a": "a", "text_b": "b", "label": 7}, {"text_a": "c", "text_b": "d", "label": -1}]
    task = load_task(str(make_task(tmp_path, records, records, records)))
    assert task.labels == [-1, 7] and task.num_labels == 2 and task.class_index(7) == 1
    assert task.splits["dev"][0].text_b == "b"


def test_missing_split(tmp_path):
    with pytest.raises(TaskError, match="test"):
        load_task(str(make_task(tmp_path, test=None)))


def test_label_unseen_in_train(tmp_path):
    dev = GOOD + [{"text": "meh", "label": 2}]
    with pytest.raises(TaskError, match=r"dev.jsonl example 3 .*label 2"):
        load_task(str(make_task(tmp_path, dev=dev)))


@pytest.mark.parametrize("label", ["positive", 1.5, True, None])
def test_non_integer_label(tmp_path, label):
    train = GOOD + [{"text": "x", "label": label}]
    with pytest.raises(TaskError, match=r"train.jsonl line 3 .*label="):
        load_task(str(make_task(tmp_path, train=train)))


def test_missing_text_field_and_bad_json(tmp_path):
    with pytest.raises(TaskError, match="'text_a'"):
        load_task(str(make_task(tmp_path, train=[{"sentence": "x", "label": 0}])))
    (tmp_path / "train.jsonl").write_text("{not json\n")
    with pytest.raises(TaskError, match="train.jsonl line 1"):
        load_task(str(tmp_path))


def test_not_an_electra_directory(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelDirError, match="model_type='bert'"):
        resolve_model_dir(str(bert))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelDirError, match=re.escape(str(empty))):
        resolve_model_dir(str(empty))
    with pytest.raises(ModelDirError, match=re.escape(str(tmp_path / "nowhere"))):
        resolve_model_dir(str(tmp_path / "nowhere"))


def test_export_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "electra"}))
    with pytest.raises(ModelDirError, match=re.escape(str(tmp_path))):
        resolve_model_dir(str(tmp_path))


def test_cli_reports_one_line_and_exits_2(tmp_path, capsys, tiny_export):
    task = make_task(tmp_path / "task", test=None) if (tmp_path / "task").mkdir() is None else None
    assert finetune_main(["--model", str(tiny_export), "--task", str(task)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("finetune.py: error: ") and "no test split" in error
    write_jsonl(task / "test.jsonl", GOOD)
    assert finetune_main(["--model", str(tmp_path), "--task", str(task)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert finetune_main(["--model", str(tiny_export), "--task", str(task), "--max-seq-len", "4096"]) == 2
    assert "max_position_embeddings=128" in capsys.readouterr().err
