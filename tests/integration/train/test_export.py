"""Hugging Face export, plots and monitors of a real run.

The reference for the exported logits is the trained model itself (fp32 weights
consolidated from the ZeRO-2 shards) with exits off: `from_pretrained` on the export
must reproduce its discriminator logits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from dsexit.cpu.allocator import find_tcmalloc

from .helpers import ENV, REPO


def _probe(tokenizer):
    return tokenizer(
        [
            "Call me Ishmael. Some years ago, never mind how long precisely",
            "It is a truth universally acknowledged, that a single man",
        ],
        ["having little or no money in my purse", "in possession of a good fortune"],
        padding=True,
        return_tensors="pt",
    )


def test_export_logits_equal_the_trained_model_with_exits_off(zero2_straight):
    from transformers import AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining

    from dsexit.model import ExitDecision
    from dsexit.train.export import load_trained_model

    export_dir = zero2_straight.run_dir / "hf"  # written by the trainer at the end of the run
    assert json.loads((export_dir / "dsexit_export.json").read_text())["step"] == 20
    trained = load_trained_model(str(zero2_straight.checkpoints / "global_step20"))
    exported = ElectraForPreTraining.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    batch = _probe(tokenizer)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = trained.discriminator(
            batch["input_ids"], real, batch["token_type_ids"], decision=ExitDecision(threshold=None)
        ).logits
        theirs = exported(**batch).logits
    assert torch.allclose(ours[real], theirs[real], rtol=1e-5, atol=1e-5), (ours[real] - theirs[real]).abs().max()
    assert not torch.allclose(theirs[real], torch.zeros_like(theirs[real]))

    generator = ElectraForMaskedLM.from_pretrained(export_dir / "generator").eval()
    with torch.no_grad():
        assert generator(**batch).logits.shape[-1] == trained.config.vocab_size


def test_export_cli_writes_a_loadable_directory(zero2_straight, tmp_path):
    from transformers import ElectraForPreTraining

    out = tmp_path / "export10"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "export_hf.py"),
            str(zero2_straight.checkpoints / "global_step10"),
            str(out),
            "--no-generator",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = ElectraForPreTraining.from_pretrained(out)
    step20 = ElectraForPreTraining.from_pretrained(zero2_straight.run_dir / "hf")
    name = "electra.embeddings.word_embeddings.weight"
    assert not torch.equal(model.state_dict()[name], step20.state_dict()[name])  # step 10, not the final weights
    assert not (out / "generator").exists()
    assert (out / "vocab.txt").exists()


def test_run_directory_has_config_metrics_monitors_and_plots(zero2_straight, tmp_path):
    run_dir = zero2_straight.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["dp_size"] == 2 and config["deepspeed"]["zero_optimization"]["stage"] == 2
    assert config["deepspeed"]["train_batch_size"] == 32 and config["derived"]["grad_accum"] == 2
    # With DSEXIT_TCMALLOC=auto (helpers.ENV), each rank re-executed itself with tcmalloc preloaded (the
    # launcher's processes, their PIDs kept).
    assert config["derived"]["host_allocator"] == ("tcmalloc" if find_tcmalloc() else "glibc")
    marker = json.loads((zero2_straight.checkpoints / "global_step20" / "dsexit_checkpoint.json").read_text())
    assert marker["config"] == config  # the resolved config travels with every checkpoint
    record = zero2_straight.metrics[20]
    assert len(record["exit_layer_counts"]) == 4 and sum(record["exit_layer_counts"]) > 0
    for key in (
        "generator_loss",
        "discriminator_loss",
        "rtd_accuracy",
        "mean_exit_layer",
        "compute_fraction",
        "tokens_per_s",
        "data_wait_pct",
        "lr",
    ):
        assert isinstance(record[key], float), key
    assert list((run_dir / "monitor" / "tensorboard").glob("events.out.tfevents.*"))
    csv_lines = (run_dir / "monitor" / "csv" / "Train_generator_loss.csv").read_text().splitlines()
    assert len(csv_lines) >= 20
    assert "step=20/20 gen_loss=" in (run_dir / "train.log").read_text()
    # Held-out evaluation at the start and the end, its baselines beside it.
    evals = zero2_straight.eval_metrics
    assert sorted(evals) == [0, 20]
    for key in (
        "eval_rtd_loss_uniform",
        "eval_rtd_auc_uniform",
        "eval_rtd_loss_generator",
        "eval_mlm_loss",
        "rtd_prior_entropy",
        "unigram_entropy",
        "eval_compute_fraction",
        "eval_rtd_loss_uniform_exit",
    ):
        assert isinstance(evals[20][key], float), key
    assert evals[20]["eval_rtd_loss_uniform"] < evals[0]["eval_rtd_loss_uniform"]  # it learned something
    assert 0.3 < evals[20]["rtd_prior_entropy"] < 0.45 and 5.0 < evals[20]["unigram_entropy"] < 9.0
    assert "eval step=20 rtd_loss_uniform=" in (run_dir / "train.log").read_text()
    assert (run_dir / "monitor" / "csv" / "Eval_eval_rtd_loss_uniform.csv").exists()

    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "plot_run.py"), str(run_dir), "--out", str(tmp_path / "plots")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("losses.png", "compute.png", "exit_layers.png", "heldout.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
