"""Fine-tuning really learns, reports the GLUE-style median, and takes dsexit checkpoints.

The learnability test can fail: a tiny random ELECTRA must separate sentences holding a
positive word from sentences holding a negative one after one epoch, well above chance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsexit.commands.finetune import main as finetune_main
from dsexit.eval import FinetuneConfig, finetune, finetune_many, load_task

from .conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]


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
    config = FinetuneConfig(lr=2e-3, epochs=2, batch_size=32, max_seq_len=32, seeds=1, select="best-dev",
                            max_train_examples=96, progress="none")
    run = finetune(str(tiny_export), load_task(str(synthetic_task)), config)["per_seed"][0]
    best = max(run["epochs"], key=lambda record: record["dev"]["accuracy"])
    assert run["selected_epoch"] == best["epoch"] and run["test"] == best["test"]
    assert run["epochs"][0]["train_loss"] > 0


@pytest.mark.skipif(not (SHARED_DATA / "downstream" / "rt_sentiment").is_dir(),
                    reason="the shared rt_sentiment task (../shared/data/downstream/rt_sentiment) is absent")
def test_cli_on_rt_sentiment_slice_writes_json(tiny_export, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = finetune_main(["--model", str(tiny_export), "--task", str(SHARED_DATA / "downstream" / "rt_sentiment"),
                          "--seeds", "2", "--epochs", "1", "--max-train-examples", "256", "--max-eval-examples", "200",
                          "--max-seq-len", "64", "--progress", "none", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == {"train": 256, "dev": 200, "test": 200}
    assert len(result["per_seed"]) == 2 and set(result["median"]) == {"dev", "test"}
    for metrics in result["median"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and -1.0 <= metrics["mcc"] <= 1.0
    assert "median" in capsys.readouterr().out


def test_dsexit_checkpoint_is_exported_by_the_trainer_and_fine_tuned(tmp_path, synthetic_task):
    """A real trainer run (3 steps) leaves a checkpoint; finetune.py converts it via export_hf."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--run-dir", str(run_dir), "--max-steps", "3",
                    "--global-batch-size", "8", "--micro-batch-size", "8", "--no-export-hf", "--no-tensorboard",
                    "--no-csv", "--progress", "lines", "--resume", "none"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    export_dir = tmp_path / "export"
    out = tmp_path / "result.json"
    code = finetune_main(["--model", str(run_dir / "checkpoints"), "--task", str(synthetic_task), "--seeds", "1",
                          "--epochs", "1", "--max-train-examples", "64", "--max-eval-examples", "64",
                          "--max-seq-len", "32", "--progress", "none", "--export-dir", str(export_dir), "--out", str(out)])
    assert code == 0
    assert json.loads((export_dir / "dsexit_export.json").read_text())["step"] == 3
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "electra"
    assert json.loads(out.read_text())["examples"]["train"] == 64


def test_parallel_workers_give_each_model_its_own_sequential_results(tiny_export, synthetic_task, tmp_path):
    """Jobs spread over worker processes come back to the right model and seed, as a sequential run gives them."""
    import shutil

    import torch
    from transformers import ElectraForPreTraining

    other = tmp_path / "other_init"
    shutil.copytree(tiny_export, other)
    torch.manual_seed(1)
    reinitialised = ElectraForPreTraining(ElectraForPreTraining.config_class.from_pretrained(tiny_export))
    reinitialised.save_pretrained(other)
    task = load_task(str(synthetic_task))
    config = FinetuneConfig(lr=2e-3, epochs=1, batch_size=16, max_seq_len=32, seeds=2, precision="fp32",
                            max_train_examples=128, progress="none")
    finished = []
    parallel = finetune_many([str(tiny_export), str(other)], task, config, workers=2,
                             on_done=lambda model_dir, run: finished.append((model_dir, run["seed"])))
    assert sorted(finished) == sorted((str(d), s) for d in (tiny_export, other) for s in (1, 2))
    sequential = [finetune(str(model_dir), task, config) for model_dir in (tiny_export, other)]
    losses = {}
    for got, want in zip(parallel, sequential):
        assert got["model_dir"] == want["model_dir"] and got["examples"] == {"train": 128, "dev": 200, "test": 200}
        assert [run["seed"] for run in got["per_seed"]] == [1, 2]
        for got_run, want_run in zip(got["per_seed"], want["per_seed"]):
            assert got_run["epochs"][0]["train_loss"] == pytest.approx(want_run["epochs"][0]["train_loss"], rel=1e-4)
            losses[got["model_dir"], got_run["seed"]] = got_run["epochs"][0]["train_loss"]
    # The two initialisations really differ, so a mix-up of models would have been seen above.
    assert losses[str(tiny_export), 1] != pytest.approx(losses[str(other), 1], rel=1e-3)
