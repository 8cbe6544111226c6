"""The 2-stage pipeline on real processes: equal to the data-parallel path, skips exited micro-batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import free_port

WORKER = Path(__file__).with_name("pipe_worker.py")


def run_two_stages(tmp_path: Path, mode: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
        mode,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("mode", ["plain", "exits"])
def test_two_stage_pipeline_matches_data_parallel_and_learns(tmp_path, mode):
    stage_one, stage_two = run_two_stages(tmp_path, mode)
    assert (stage_one["stage"], stage_two["stage"]) == (0, 1)
    first_loss = stage_two["losses"][0]
    assert abs(first_loss - stage_two["reference_first_loss"]) <= 1e-5 * abs(first_loss)
    assert stage_two["losses"][-1] < stage_two["losses"][0]
    assert stage_one["losses"] == stage_two["losses"]  # train_batch broadcasts the last stage's loss
    for step in stage_two["counters"]:
        assert step["micro_batches"] == 4
        if mode == "exits":
            # Micro-batches 1 and 3 left entirely after layer 1, on stage 1: stage 2 ran nothing for them.
            assert step["skipped_micro_batches"] == 2
        else:
            assert step["skipped_micro_batches"] == 0
            # 2 layers x 4 micro-batches x exitable tokens (real tokens but each sample's pinned [CLS])
            assert step["token_layers"] == 2 * 4 * (4 * 32 - 5 - 4)
    assert all(step["skipped_micro_batches"] == 0 for step in stage_one["counters"])


@pytest.mark.parametrize("exit_kv,zero_stage", [("keep", 0), ("drop", 0), ("keep", 1)])
def test_pipeline_losses_and_clipped_gradients_equal_the_data_parallel_models(tmp_path, exit_kv, zero_stage):
    """Three steps, tokens exiting by threshold and by forced plans (one micro-batch skips stage 2),
    gradient clipping active: every stage's clipped gradient equals the data-parallel model's."""
    stages = run_two_stages(tmp_path, f"grads:{exit_kv}:{zero_stage}")
    assert [stage["stage"] for stage in stages] == [0, 1]
    for stage in stages:
        for step in stage["steps"]:
            assert step["loss"] == pytest.approx(step["reference_loss"], rel=1e-5)
            assert step["norm_before_clipping"] > 0.5  # the clip is active
            assert step["gradient_norm"] > 0
            assert step["gradient_error"] < 1e-4, (stage["stage"], step)
            # One backward per micro-batch through the stage's layers, though DeepSpeed calls
            # backward once per float output of stage 1 (skipped micro-batches run neither).
            assert step["first_layer_backward_passes"] == step["first_layer_forward_passes"] > 0, (stage, step)
