"""A real trainer run (3 steps, its own process) leaves a checkpoint that fine-tuning converts and uses."""

import json
import os
import subprocess
import sys

from dsexit.commands.finetune import main as finetune_main
from tests.helpers import REPO


def test_dsexit_checkpoint_is_exported_by_the_trainer_and_fine_tuned(tmp_path, synthetic_task):
    """A real trainer run (3 steps) leaves a checkpoint; finetune.py converts it via export_hf."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain.py"),
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "3",
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "8",
            "--no-export-hf",
            "--no-tensorboard",
            "--no-csv",
            "--progress",
            "lines",
            "--resume",
            "none",
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    export_dir = tmp_path / "export"
    out = tmp_path / "result.json"
    code = finetune_main(
        [
            "--model",
            str(run_dir / "checkpoints"),
            "--task",
            str(synthetic_task),
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--max-train-examples",
            "64",
            "--max-eval-examples",
            "64",
            "--max-seq-len",
            "32",
            "--progress",
            "none",
            "--export-dir",
            str(export_dir),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((export_dir / "dsexit_export.json").read_text())["step"] == 3
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "electra"
    assert json.loads(out.read_text())["examples"]["train"] == 64
