"""Exact resume: a run killed mid-save and resumed equals an uninterrupted one.

2 ranks, ZeRO-2, through the `deepspeed` launcher. The interrupted run is SIGKILLed by
rank 0 after DeepSpeed wrote the shards of step 20 but before the completion marker,
so it also proves that a torn save leaves the previous checkpoint as the one
`--resume auto` picks. Resuming at another world size (2 -> 1) goes through the
trainer's universal conversion and must keep the data position.
"""

from __future__ import annotations

import json

from .helpers import ZERO2_ARGS, launch, resumed_at


def _relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def test_loss_falls_in_a_zero2_run(zero2_straight):
    metrics = zero2_straight.metrics
    assert sorted(metrics) == list(range(1, 21))
    first = sum(metrics[step]["loss"] for step in (1, 2, 3)) / 3
    last = sum(metrics[step]["loss"] for step in (18, 19, 20)) / 3
    assert last < 0.85 * first, (first, last)
    assert metrics[20]["generator_loss"] < metrics[1]["generator_loss"]
    assert metrics[20]["samples_seen"] == 20 * 32


def test_torn_save_leaves_previous_checkpoint_complete(zero2_interrupted):
    killed, resumed = zero2_interrupted
    assert resumed_at(killed, resumed) == 10  # the torn save of step 20 was skipped


def test_resume_after_kill_repeats_the_uninterrupted_run(zero2_straight, zero2_interrupted):
    _, resumed = zero2_interrupted
    straight, again = zero2_straight.metrics, resumed.metrics
    assert sorted(again) == list(range(1, 21))  # records past the resumed step were replaced, not duplicated
    for step in range(11, 21):
        assert again[step]["samples_digest"] == straight[step]["samples_digest"], step
        for name in ("loss", "generator_loss", "discriminator_loss", "rtd_accuracy", "compute_fraction"):
            assert _relative_error(again[step][name], straight[step][name]) <= 1e-6, (step, name)
        assert again[step]["exit_threshold"] == straight[step]["exit_threshold"], step
        assert again[step]["exit_layer_counts"] == straight[step]["exit_layer_counts"], step
    # The held-out evaluation of the resumed run's final model equals the uninterrupted run's.
    for name in ("eval_rtd_loss_uniform", "eval_rtd_loss_generator", "eval_mlm_loss", "eval_compute_fraction"):
        assert _relative_error(resumed.eval_metrics[20][name], zero2_straight.eval_metrics[20][name]) <= 1e-5, name
    latest = (resumed.checkpoints / "latest").read_text()
    assert latest == "global_step20"
    marker = json.loads((resumed.checkpoints / "global_step20" / "dsexit_checkpoint.json").read_text())
    assert marker["step"] == 20 and marker["dp_size"] == 2 and marker["zero_stage"] == 2


def test_resume_at_another_world_size_keeps_the_data_position(zero2_straight, tmp_path):
    step10 = zero2_straight.checkpoints / "global_step10"
    one_rank = launch("deepspeed", tmp_path / "one_rank", [*ZERO2_ARGS, "--resume", str(step10)], nproc=1).check()
    assert (zero2_straight.checkpoints / "universal" / "global_step10").is_dir()  # converted for dp 1
    straight, again = zero2_straight.metrics, one_rank.metrics
    assert sorted(again) == list(range(11, 21))
    for step in range(11, 21):
        # the same global samples in every step, now read by one rank instead of two
        assert again[step]["samples_digest"] == straight[step]["samples_digest"], step
        assert again[step]["samples_seen"] == straight[step]["samples_seen"]
    # weights and optimizer state came through: training continues where it was, not from scratch
    assert again[11]["loss"] < 0.9 * straight[1]["loss"]
    assert abs(again[11]["loss"] - straight[11]["loss"]) < 0.1 * straight[11]["loss"]
    marker = json.loads((one_rank.checkpoints / "global_step20" / "dsexit_checkpoint.json").read_text())
    assert marker["dp_size"] == 1
