"""Fine-tuning really learns and reports the GLUE-style median (dsexit checkpoints and worker processes:
tests/integration/eval/).

The learnability test can fail: a tiny random ELECTRA must separate sentences holding a
positive word from sentences holding a negative one after one epoch, well above chance.
"""

import json

import pytest

from dsexit.commands.finetune import main as finetune_main
from dsexit.eval import FinetuneConfig, finetune, load_task
from tests.helpers import SHARED_DATA


def test_random_tiny_electra_learns_polar_words_in_one_epoch(tiny_export, synthetic_task):
    config = FinetuneConfig(lr=2e-3, epochs=1, batch_size=16, max_seq_len=32, seeds=3, progress="none")
    result = finetune(str(tiny_export), load_task(str(synthetic_task)), config)
    accuracies = sorted(run["test"]["accuracy"] for run in result["per_seed"])
    assert result["median"]["test"]["accuracy"] == accuracies[1]  # median of three seeds
    assert result["median"]["dev"]["accuracy"] >= 0.8, result["median"]
    assert result["median"]["test"]["accuracy"] >= 0.8, result["median"]
    assert result["median"]["test"]["mcc"] >= 0.6
    assert [run["seed"] for run in result["per_seed"]] == [1, 2, 3]
    assert all(run["selected_epoch"] == 1 for run in result["per_seed"])


def test_best_dev_selection_reports_the_best_dev_epoch(tiny_export, synthetic_task):
    config = FinetuneConfig(
        lr=2e-3,
        epochs=2,
        batch_size=32,
        max_seq_len=32,
        seeds=1,
        select="best-dev",
        max_train_examples=96,
        progress="none",
    )
    run = finetune(str(tiny_export), load_task(str(synthetic_task)), config)["per_seed"][0]
    best = max(run["epochs"], key=lambda record: record["dev"]["accuracy"])
    assert run["selected_epoch"] == best["epoch"] and run["test"] == best["test"]
    assert run["epochs"][0]["train_loss"] > 0


@pytest.mark.skipif(
    not (SHARED_DATA / "downstream" / "rt_sentiment").is_dir(),
    reason="the shared rt_sentiment task (../shared/data/downstream/rt_sentiment) is absent",
)
def test_cli_on_rt_sentiment_slice_writes_json(tiny_export, tmp_path):
    out = tmp_path / "result.json"
    code = finetune_main(
        [
            "--model",
            str(tiny_export),
            "--task",
            str(SHARED_DATA / "downstream" / "rt_sentiment"),
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--max-train-examples",
            "256",
            "--max-eval-examples",
            "200",
            "--max-seq-len",
            "64",
            "--progress",
            "none",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == {"train": 256, "dev": 200, "test": 200}
    assert len(result["per_seed"]) == 2 and set(result["median"]) == {"dev", "test"}
    for metrics in result["median"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and -1.0 <= metrics["mcc"] <= 1.0
