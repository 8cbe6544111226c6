"""`--compile auto|on|off`: the model's training forward and loss under `torch.compile`, in place.

`fullgraph=True, dynamic=False`: the dense step has static shapes and reads nothing back from the
device (`tests/integration/model/test_static_step.py`), so it compiles to one graph per batch shape. The
model's forward is compiled in place (`CompiledForward`), so parameter and checkpoint names keep no
`_orig_mod.` prefix. On CUDA with inductor, `mode="reduce-overhead"`
replays the step as a CUDA graph; each micro-batch starts a fresh graph step, and the step
statistics copy what they read before the next replay (`StepStats.add`).

`auto` compiles on CUDA and not on a CPU (there the CPU kernels of `dsexit.cpu`, which do not
compile, run faster; docs/cpu.md). ZeRO-3 and the pipeline stay eager. Threshold exits route tokens by
reading the device, so once exits start the forward falls back to eager (one log line). Capacity
routing keeps static shapes and stays compiled: one graph per capacity level the run visits, each
compiled the first time (dynamo's recompile limit is raised to the number of levels, and the
warm-up's graph without exits).
"""

from __future__ import annotations

import logging

import torch

from dsexit.model import kernels
from dsexit.model.capacity import LEVELS

log = logging.getLogger("dsexit")


def compile_decision(choice: str, device: torch.device, zero_stage: int, pipeline_stages: int) -> tuple[bool, str]:
    """(compile or not, why) for the resolved run."""
    if choice == "off":
        return False, "--compile off"
    if pipeline_stages > 1:
        return False, "the pipeline stays eager (its stages pass variable work between processes)"
    if zero_stage == 3:
        return False, "ZeRO-3 stays eager (its parameter hooks gather around every module call)"
    if choice == "auto" and device.type != "cuda":
        return False, f"--compile auto compiles on CUDA only (this device: {device.type})"
    return True, f"--compile {choice}"


class CompiledForward:
    """Compiles an engine's model forward in place and switches it back to eager once tokens may exit.

    The model's `forward` is replaced by its compiled version on the instance (names, parameters and
    checkpoints are the model's own). Not `nn.Module.compile`, which compiles the module's whole call
    with its hooks: DeepSpeed's forward hooks read the engine's micro-step counter, a new value each
    micro-batch, so every call would recompile until `fullgraph=True` gave up."""

    def __init__(self, engine, device: torch.device, backend: str = "inductor", capacity_routing: bool = False):
        if not kernels.uses_defaults():
            raise RuntimeError(
                "a compiled forward needs torch's own dropout and attention, but this process's set-up put the "
                "CPU kernels in the model's slots; set the process up with setup_process(cpu_kernels=False)."
            )
        self.engine, self.device, self.backend = engine, device, backend
        self.cuda_graphs = device.type == "cuda" and backend == "inductor"
        kwargs = {"fullgraph": True, "dynamic": False}
        if self.cuda_graphs:
            kwargs["mode"] = "reduce-overhead"
        if capacity_routing:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, LEVELS + 1)
        self.module = engine.module
        self.module.forward = torch.compile(self.module.forward, backend=backend, **kwargs)
        self.eager = False
        self.first_step_logged = False

    def before_forward(self, exit_threshold: float | None) -> None:
        """Called before every micro-batch's forward."""
        if exit_threshold is not None and not self.eager:
            # Threshold routing reads the device (capacity routing, with static shapes, stays compiled).
            del self.module.forward  # the class's own forward again
            self.eager = True
            log.info("exits started: the forward runs eagerly from here (threshold routing reads the device)")
        if self.cuda_graphs and not self.eager:
            torch.compiler.cudagraph_mark_step_begin()
