"""`launch/pretrain.py --pipeline-stages 2` on real processes: learns, resumes exactly, exports,
evaluates held-out samples, and its late stage skips micro-batches whose tokens all exited.

2 stages x dp 1 through the `deepspeed` launcher, electra-tiny, ds_configs/pipeline.json
(ZeRO 1). The interrupted run is SIGKILLed in the middle of saving step 12
(tests/integration/train/fault_entry.py), then resumed with `--resume auto` from step 6.
The exiting run trains with a fixed low tau, so that tokens leave at the first heads (stage 1
holds layers 1-2, stage 2 layers 3-4) once the exit warmup is over.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsexit.train.heldout import EVAL_FIELDS
from tests.helpers import REPO
from tests.helpers.servers import free_port
from tests.integration.train.helpers import ENV, TINY, launch, resumed_at

PIPELINE = ["--deepspeed", "ds_configs/pipeline.json", "--pipeline-stages", "2"]
PIPE_ARGS = [*TINY, *PIPELINE, "--max-steps", "12", "--save-interval", "6", "--keep-last", "3"]
EXIT_WARMUP_STEPS = 2
EXIT_ARGS = [
    *TINY,
    *PIPELINE,
    "--max-steps",
    "8",
    "--save-interval",
    "4",
    "--keep-last",
    "2",
    "--eval-interval",
    "4",
    "--exit-warmup-steps",
    str(EXIT_WARMUP_STEPS),
    "--exit-threshold",
    "0.1",
    "--target-compute",
    "none",
    "--no-export-hf",
]
HELDOUT_WORKER = Path(__file__).with_name("heldout_worker.py")


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    straight = launch("deepspeed", root / "straight", PIPE_ARGS).check()
    killed = launch("deepspeed", root / "interrupted", PIPE_ARGS, kill_at_save=12)
    assert killed.returncode != 0, "fault_entry.py did not kill the run"
    resumed = launch("deepspeed", root / "interrupted", [*PIPE_ARGS, "--resume", "auto", "--no-export-hf"]).check()
    return straight, killed, resumed


def _relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_two_stage_training_reduces_the_loss(pipeline_runs):
    straight, _, _ = pipeline_runs
    metrics = straight.metrics
    assert sorted(metrics) == list(range(1, 13))
    first = sum(metrics[step]["loss"] for step in (1, 2, 3)) / 3
    last = sum(metrics[step]["loss"] for step in (10, 11, 12)) / 3
    assert last < 0.9 * first, (first, last)
    for record in metrics.values():  # per-stage counters are logged with every step
        stages = record["pipeline_stages"]
        assert [stage["stage"] for stage in stages] == [0, 1]
        assert all(stage["micro_batches"] == 4 and 0 <= stage["skipped_micro_batches"] <= 4 for stage in stages)
        assert stages[0]["token_layers"] > 0 and stages[0]["skipped_micro_batches"] == 0
    marker = json.loads((straight.checkpoints / "global_step12" / "dsexit_checkpoint.json").read_text())
    assert marker["pipeline_stages"] == 2 and marker["zero_stage"] == 1


def test_pipeline_resume_continues_exactly(pipeline_runs):
    straight, killed, resumed = pipeline_runs
    assert resumed_at(killed, resumed) == 6  # the torn save of step 12 was skipped
    for step in range(7, 13):
        before, again = straight.metrics[step], resumed.metrics[step]
        assert again["samples_digest"] == before["samples_digest"], step
        for name in ("loss", "generator_loss", "discriminator_loss", "rtd_accuracy", "compute_fraction"):
            assert _relative_error(again[name], before[name]) <= 1e-6, (step, name)
    for name in EVAL_FIELDS:  # the final held-out evaluation too
        assert _relative_error(resumed.eval_metrics[12][name], straight.eval_metrics[12][name]) <= 1e-6, name


def test_pipeline_checkpoint_exports_to_hugging_face(pipeline_runs):
    from transformers import ElectraForPreTraining

    from dsexit.train.export import load_trained_model

    straight, _, _ = pipeline_runs
    model = load_trained_model(str(straight.checkpoints / "global_step12"))
    exported = ElectraForPreTraining.from_pretrained(straight.run_dir / "hf").eval()
    input_ids = torch.randint(1000, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0] = model.config.cls_token_id
    mask, types = torch.ones_like(input_ids), torch.zeros_like(input_ids)
    with torch.no_grad():
        ours = model.discriminator(input_ids, mask, types).logits
        theirs = exported(input_ids=input_ids, attention_mask=mask, token_type_ids=types).logits
    assert (ours - theirs).abs().max() <= 1e-5
    # Trained weights, not a fresh init: the export differs from a newly built model.
    fresh = type(model)(model.config).eval()
    with torch.no_grad():
        assert (fresh.discriminator(input_ids, mask, types).logits - ours).abs().max() > 1e-3


@pytest.fixture(scope="module")
def exiting_run(tmp_path_factory):
    return launch("deepspeed", tmp_path_factory.mktemp("pipeline_exits") / "run", EXIT_ARGS).check()


def test_the_late_stage_skips_micro_batches_whose_tokens_all_exited_in_training(exiting_run):
    """Pinned [CLS]/[SEP] leave with their sequence's last exitable token, so in a real training run a
    micro-batch whose tokens all left on stage 1 has no active token on stage 2, which runs nothing for it."""
    metrics = exiting_run.metrics
    assert sorted(metrics) == list(range(1, 9))
    skipping = []
    for step, record in metrics.items():
        first, last = record["pipeline_stages"]
        assert first["micro_batches"] == last["micro_batches"] == 4
        assert first["skipped_micro_batches"] == 0
        if step <= EXIT_WARMUP_STEPS:  # no exits yet: every token runs every layer
            assert last["skipped_micro_batches"] == 0 and record["compute_fraction"] == 1.0
        elif last["skipped_micro_batches"] > 0:
            skipping.append(step)
        if last["skipped_micro_batches"] == 4:
            # Nothing ran on stage 2 and no token's last layer is one of its layers.
            assert last["token_layers"] == 0 and sum(record["exit_layer_counts"][2:]) == 0, record
    assert skipping, {step: record["pipeline_stages"] for step, record in metrics.items()}


def test_pipeline_heldout_records_equal_the_data_parallel_evaluator_on_the_same_weights(exiting_run, tmp_path):
    """Every eval record of the pipeline run equals the data-parallel evaluator run on the checkpoint of
    that step, loaded as a plain model, in a world of the same size (each rank evaluating its slice)."""
    evals = exiting_run.eval_metrics
    assert sorted(evals) == [0, 4, 8]
    for record in evals.values():
        assert set(EVAL_FIELDS) <= set(record) and record["eval_samples"] == 64
    assert evals[8]["eval_compute_fraction"] < 1.0  # the exit arm ran under a threshold
    steps = [f"{step}:{evals[step]['exit_threshold']}" for step in (4, 8)]
    out = tmp_path / "reference.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(HELDOUT_WORKER),
        str(exiting_run.run_dir),
        str(out),
        *steps,
    ]
    result = subprocess.run(
        command, cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = json.loads(out.read_text())
    for step in (4, 8):
        for name in EVAL_FIELDS:
            ours, theirs = evals[step][name], reference[str(step)][name]
            assert math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9), (step, name, ours, theirs)
