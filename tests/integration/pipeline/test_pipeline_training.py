"""`launch/pretrain.py --pipeline-stages 2` on real processes: learns, resumes exactly, exports.

2 stages x dp 1 through the `deepspeed` launcher, electra-tiny, ds_configs/pipeline.json
(ZeRO 1). The interrupted run is SIGKILLed in the middle of saving step 12
(tests/integration/train/fault_entry.py), then resumed with `--resume auto` from step 6.
"""

import json

import pytest
import torch

from tests.integration.train.helpers import TINY, launch, resumed_at

PIPE_ARGS = [
    *TINY,
    "--deepspeed",
    "ds_configs/pipeline.json",
    "--pipeline-stages",
    "2",
    "--max-steps",
    "12",
    "--save-interval",
    "6",
    "--keep-last",
    "3",
]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    straight = launch("deepspeed", root / "straight", PIPE_ARGS).check()
    killed = launch("deepspeed", root / "interrupted", PIPE_ARGS, kill_at_save=12)
    assert killed.returncode != 0, "fault_entry.py did not kill the run"
    resumed = launch("deepspeed", root / "interrupted", [*PIPE_ARGS, "--resume", "auto"]).check()
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
