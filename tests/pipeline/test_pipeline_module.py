"""The 2-stage pipeline on real processes: equal to the data-parallel path, skips exited micro-batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("pipe_worker.py")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_stages(tmp_path: Path, mode: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(WORKER), str(tmp_path), mode]
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
