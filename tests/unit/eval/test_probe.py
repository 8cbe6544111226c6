"""The frozen-feature linear probe: the result format of fine-tuning, a frozen encoder, separable features."""

import hashlib
import json

from dsexit.commands.finetune import main as finetune_main
from dsexit.eval import FinetuneConfig, finetune, load_task
from dsexit.eval.finetune import encode_task
from dsexit.eval.probe import extract_features
from tests.helpers.tasks import first_word_task  # noqa: F401  (a fixture)


def test_probe_returns_the_fine_tuning_result_format(tiny_export, synthetic_task):
    config = FinetuneConfig(
        mode="probe", seeds=3, max_seq_len=32, max_train_examples=64, max_eval_examples=32, progress="none"
    )
    result = finetune(str(tiny_export), load_task(str(synthetic_task)), config)
    assert "probe" in result["protocol"] and "median over 3 seeds" in result["protocol"]
    assert [run["seed"] for run in result["per_seed"]] == [1, 2, 3]
    assert result["examples"] == {"train": 64, "dev": 32, "test": 32}
    for split in ("dev", "test"):
        assert set(result["median"][split]) >= {"accuracy", "f1", "mcc"}
        assert 0.0 <= result["median"][split]["accuracy"] <= 1.0
    run = result["per_seed"][0]
    assert run["selected_epoch"] == 1 and len(run["epochs"]) == 1 and run["epochs"][0]["train_loss"] > 0


def test_probe_separates_first_word_labels_from_random_features(tiny_export, first_word_task):
    """Even a random encoder's [CLS] state depends on the first word; a linear probe finds it."""
    config = FinetuneConfig(mode="probe", seeds=2, max_seq_len=16, progress="none")
    result = finetune(str(tiny_export), load_task(str(first_word_task)), config)
    assert result["median"]["dev"]["accuracy"] >= 0.9, result["median"]
    assert result["median"]["test"]["accuracy"] >= 0.9, result["median"]


def test_features_come_from_a_frozen_encoder_in_eval_mode(tiny_export, first_word_task):
    """Extraction leaves the model files untouched and is deterministic (no dropout)."""

    def digest():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tiny_export.iterdir()}

    before = digest()
    task = load_task(str(first_word_task))
    config = FinetuneConfig(mode="probe", max_seq_len=16, max_train_examples=20, max_eval_examples=10)
    data = encode_task(str(tiny_export), task, config)
    first, second = (extract_features(str(tiny_export), data, batch_size=8) for _ in range(2))
    assert digest() == before
    for split in ("train", "dev", "test"):
        assert first[split].inputs.shape == (len(data[split]), 64)
        assert first[split].inputs.equal(second[split].inputs)
    assert first["train"].inputs.mean(0).abs().max() < 1e-4  # standardised with the train statistics


def test_cli_mode_probe(tiny_export, first_word_task, tmp_path):
    out = tmp_path / "result.json"
    code = finetune_main(
        [
            "--model",
            str(tiny_export),
            "--task",
            str(first_word_task),
            "--mode",
            "probe",
            "--seeds",
            "1",
            "--max-seq-len",
            "16",
            "--progress",
            "none",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["mode"] == "probe" and len(result["per_seed"]) == 1
