"""The pretrain command's start on each device, in a fresh process: a GPU process imports nothing of
`dsexit.cpu`, with the trainer's modules loaded; a CPU process enters the CPU tuning, with the CPU
kernels unless the model will be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The command's dry run (parse, set-up, resolution), then the modules a training run goes on to import.
_START = """
import json, sys
from dsexit.commands.pretrain import main
assert main(sys.argv[1:]) == 0
import dsexit.train.trainer, dsexit.train.export, dsexit.parallel.pipeline
from dsexit.model import kernels
print(json.dumps({
    "cpu_modules": sorted(name for name in sys.modules if name == "dsexit.cpu" or name.startswith("dsexit.cpu.")),
    "torch_kernels": kernels.uses_defaults(),
}))
"""


@pytest.mark.parametrize(
    ("accelerator", "compile_choice", "door", "torch_kernels"),
    [
        ("cuda", "auto", False, True),  # a GPU process (its start needs no GPU: the dry run stops before one)
        ("cpu", "auto", True, False),  # eager on a CPU: the CPU kernels
        ("cpu", "on", True, True),  # compiled on a CPU: torch's kernels, which compile
    ],
    ids=["gpu", "cpu-eager", "cpu-compiled"],
)
def test_the_cpu_tuning_is_imported_only_by_a_cpu_process(tmp_path, accelerator, compile_choice, door, torch_kernels):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DSEXIT_")}
    env["DS_ACCELERATOR"] = accelerator
    arguments = ["--dry-run", "--run-dir", str(tmp_path / "run"), "--compile", compile_choice]
    command = [sys.executable, "-c", _START, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert bool(state["cpu_modules"]) == door, state
    assert state["torch_kernels"] == torch_kernels
