"""The pretrain command's start on each device, in a fresh process: a GPU process imports nothing of
`dsexit.cpu`, with the trainer's modules loaded; a CPU process enters the CPU tuning, with the CPU
kernels unless the model will be compiled, and re-executes with tcmalloc before it imports torch."""

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


def test_a_cpu_process_re_executes_with_tcmalloc_before_it_imports_torch(tmp_path):
    """`DSEXIT_TCMALLOC=auto`: the pretrain command re-executes itself before its heavy imports, so each
    rank imports torch and DeepSpeed once. `-X importtime` writes its header once per interpreter: the
    first one's imports hold no torch, and a second interpreter (the re-executed one) follows."""
    from dsexit.cpu.allocator import find_tcmalloc

    if find_tcmalloc() is None:
        pytest.skip("no tcmalloc installed here (libtcmalloc-minimal4): nothing re-executes")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DSEXIT_")}
    env.update(DS_ACCELERATOR="cpu", DSEXIT_TCMALLOC="auto")
    pretrain = os.path.join(os.path.dirname(__file__), "..", "..", "..", "launch", "pretrain.py")
    command = [sys.executable, "-X", "importtime", pretrain, "--dry-run", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    interpreters = result.stderr.split("import time: self [us] | cumulative | imported package")[1:]
    assert len(interpreters) == 2, f"expected the process to re-execute once, saw {len(interpreters)} interpreter(s)"
    first = [
        line.rsplit("|", 1)[-1].strip() for line in interpreters[0].splitlines() if line.startswith("import time:")
    ]
    assert "dsexit.cpu.allocator" in first  # the re-execution's own module, so the split is where it should be
    assert not [name for name in first if name == "torch" or name.startswith("torch.")], "torch imported before"
    second = [
        line.rsplit("|", 1)[-1].strip() for line in interpreters[1].splitlines() if line.startswith("import time:")
    ]
    assert "torch" in second
