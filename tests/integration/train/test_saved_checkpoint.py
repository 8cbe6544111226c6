"""A checkpoint written by an earlier layout of the code resumes, and repeats its run exactly.

tests/fixtures/saved_run/ holds a run directory as an older trainer left it (its README says
which, and how it was made): a checkpoint at step 3 of a 5-step run, and the records of the
steps that followed. Resumed with `--resume auto`, steps 4 and 5 must repeat those records.
"""

from __future__ import annotations

import json
import shutil

from tests.helpers import REPO

from .helpers import launch

SAVED = REPO / "tests" / "fixtures" / "saved_run"
ARGS = [
    "--model",
    "electra-tiny",
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--lr",
    "2e-3",
    "--warmup-steps",
    "3",
    "--exit-warmup-steps",
    "1",
    "--max-steps",
    "5",
    "--save-interval",
    "3",
    "--eval-interval",
    "0",
    "--no-export-hf",
    "--no-tensorboard",
    "--log-interval",
    "1",
    "--progress",
    "lines",
    "--deepspeed",
    "ds_configs/zero2.json",
]


def _relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def test_a_checkpoint_from_the_earlier_layout_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(SAVED / "run", run_dir)
    args = ["--data", str(SAVED / "data"), *ARGS, "--resume", "auto"]
    resumed = launch("python", run_dir, args, nproc=1).check()
    assert "resumed from" in resumed.output and "at step 3" in resumed.output, resumed.output[-3000:]
    expected = {record["step"]: record for record in map(json.loads, (SAVED / "expected_metrics.jsonl").open())}
    again = resumed.metrics
    assert sorted(again) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert again[step]["samples_digest"] == expected[step]["samples_digest"], step
        for name in ("loss", "generator_loss", "discriminator_loss", "rtd_accuracy", "compute_fraction"):
            assert _relative_error(again[step][name], expected[step][name]) <= 1e-6, (step, name)
        assert again[step]["exit_threshold"] == expected[step]["exit_threshold"], step
        assert again[step]["exit_layer_counts"] == expected[step]["exit_layer_counts"], step
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step5"
    marker = json.loads((run_dir / "checkpoints" / "global_step5" / "dsexit_checkpoint.json").read_text())
    run_id = json.loads((SAVED / "run" / "dsexit_run.json").read_text())["run_id"]
    assert marker["step"] == 5 and marker["run_id"] == run_id
