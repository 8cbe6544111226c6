"""One optimizer step through the engine, one runner per parallel mode, with the same interface.

`DataParallelSteps` runs grad_accum micro-batches through a `DeepSpeedEngine` (forward,
backward, step); `PipelineSteps` feeds them to a `PipelineEngine`'s `train_batch` and reads
back what the stages did and what the last stage measured from the pipeline module's own
objects. Both put each micro-batch's measurements into the trainer's `StepStats` and return a
`StepRun`; `make_step_runner` chooses. The trainer's `train_step` does not know which it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsexit.model import ElectraExitConfig
from dsexit.train.step_stats import StepStats


@dataclass
class StepRun:
    data_wait_seconds: float
    lr: float
    stage_counters: list[list[int]] | None = None  # pipeline: per stage [micro_batches, skipped, token_layers]


class StagedBatches:
    """Micro-batches moved to the device one ahead: the next one's copy is under way while the
    current one runs. On a CUDA device the host tensors are pinned and copied with `non_blocking`.

    A batch without padding travels without its attention mask (the model then runs unmasked
    attention, deciding nothing on the device); the host copy, mask included, stays with it for
    the step statistics."""

    def __init__(self, data: Iterator[dict[str, torch.Tensor]], device: torch.device):
        self.data, self.device = data, device
        self.pin = device.type == "cuda"
        self.staged: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.wait_seconds = 0.0

    def _stage(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        started = time.perf_counter()
        host = next(self.data)
        self.wait_seconds += time.perf_counter() - started
        inputs = dict(host)
        if bool(inputs["attention_mask"].all()):  # a host tensor: no device read
            del inputs["attention_mask"]
        if self.pin:
            inputs = {name: tensor.pin_memory() for name, tensor in inputs.items()}
        return host, {name: tensor.to(self.device, non_blocking=True) for name, tensor in inputs.items()}

    def next(self, stage_another: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the batch on the host, its device inputs); stages the following one when asked to."""
        current = self.staged if self.staged is not None else self._stage()
        self.staged = self._stage() if stage_another else None
        return current


def step_scalar(value: float | None, device: torch.device) -> torch.Tensor | None:
    """A per-step value as a device tensor: one compiled graph serves every step (a new Python float
    would recompile under `dynamic=False`), and it reaches a GPU by an asynchronous copy."""
    if value is None:
        return None
    host = torch.tensor(value, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class DataParallelSteps:
    """grad_accum micro-batches through a data-parallel (ZeRO 0-3) engine."""

    def __init__(
        self,
        engine,
        data: Iterator[dict[str, torch.Tensor]],
        grad_accum: int,
        device: torch.device,
        set_learning_rate: Callable[[], float],
        before_forward: Callable[[float | None], None] | None = None,
        min_confidence: float = 0.0,
    ):
        self.engine, self.grad_accum, self.device = engine, grad_accum, device
        self.batches = StagedBatches(data, device)
        self.set_learning_rate = set_learning_rate
        self.before_forward = before_forward  # the compile switch's hook (`compiling.CompiledForward`)
        self.min_confidence = min_confidence  # the floor capacity routing counts forced exits against

    def run(
        self,
        exit_threshold: float | None,
        replacement_mix: float | None,
        stats: StepStats,
        exit_capacity: int | None = None,
    ) -> StepRun:
        """`exit_capacity`: capacity routing's level, a Python int (one compiled graph per level)."""
        lr = 0.0
        self.batches.wait_seconds = 0.0
        threshold = step_scalar(exit_threshold, self.device)
        mix = step_scalar(replacement_mix, self.device) if replacement_mix else None
        capacity = {}
        if exit_capacity is not None:
            capacity = {"exit_capacity": exit_capacity, "min_confidence": self.min_confidence}
        for index in range(self.grad_accum):
            host, inputs = self.batches.next(stage_another=index + 1 < self.grad_accum)
            if self.before_forward is not None:
                self.before_forward(exit_threshold)
            output = self.engine(**inputs, exit_threshold=threshold, replacement_mix=mix, **capacity)
            self.engine.backward(output.loss)
            lr = self.set_learning_rate()  # the rate this update uses
            self.engine.step()
            stats.add(output, host)
        return StepRun(self.batches.wait_seconds, lr)


class PipelineSteps:
    """One `train_batch` of grad_accum micro-batches through a pipeline engine.

    Every stage draws the same micro-batches from its reader (the first feeds them in, the
    last takes its dummy labels, the others only keep their data position in step).
    """

    def __init__(
        self,
        engine,
        data: Iterator[dict[str, torch.Tensor]],
        grad_accum: int,
        device: torch.device,
        set_learning_rate: Callable[[], float],
        model_config: ElectraExitConfig,
        num_stages: int,
    ):
        self.engine, self.data, self.grad_accum, self.device = engine, data, grad_accum, device
        self.set_learning_rate = set_learning_rate
        self.model_config, self.num_stages = model_config, num_stages
        self.counters = engine.module.stage_counters
        self.loss = engine.module.loss_fn

    def run(
        self,
        exit_threshold: float | None,
        replacement_mix: float | None,
        stats: StepStats,
        exit_capacity: int | None = None,
    ) -> StepRun:
        """Threshold routing only (`exit_capacity` is refused with a pipeline before the run starts)."""
        from dsexit.parallel.pipeline import micro_batch_inputs

        self.loss.results.clear()
        self.counters.reset()
        batches, data_wait = [], 0.0
        for _ in range(self.grad_accum):
            fetch_started = time.perf_counter()
            batches.append(next(self.data))
            data_wait += time.perf_counter() - fetch_started
        feed = iter(
            [micro_batch_inputs(batch, self.model_config, exit_threshold, replacement_mix) for batch in batches]
        )
        lr = self.set_learning_rate()
        self.engine.train_batch(data_iter=feed)
        last_stage = self.engine.is_last_stage()
        for index, batch in enumerate(batches):
            if last_stage:
                stats.add(self.loss.results[index], batch)
            else:  # same-size fingerprints on every rank; measurements come from the last stage only
                stats.fingerprints.append(torch.zeros(batch["input_ids"].shape[0], dtype=torch.int64))
        return StepRun(data_wait, lr, stage_counters=self._gather_stage_counters())

    def _gather_stage_counters(self) -> list[list[int]]:
        """Per stage [micro-batches, skipped micro-batches, token-layers], summed over replicas."""
        counters = self.counters
        mine = torch.tensor(
            [self.engine.stage_id, counters.micro_batches, counters.skipped_micro_batches, counters.token_layers],
            dtype=torch.int64,
            device=self.device,
        )
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        per_stage = [[0, 0, 0] for _ in range(self.num_stages)]
        for stage, *values in (row.cpu().tolist() for row in everyone):
            per_stage[stage] = [a + b for a, b in zip(per_stage[stage], values)]
        return per_stage


def data_parallel_rank(engine, pipeline_stages: int, world_rank: int) -> int:
    """Data is sharded by data-parallel rank: in a pipeline, the stages of one replica read alike."""
    return engine.grid.get_data_parallel_rank() if pipeline_stages > 1 else world_rank


def make_step_runner(
    engine,
    data,
    grad_accum: int,
    device: torch.device,
    set_learning_rate: Callable[[], float],
    model_config: ElectraExitConfig,
    pipeline_stages: int,
    before_forward: Callable[[float | None], None] | None = None,
    min_confidence: float = 0.0,
):
    if pipeline_stages > 1:
        return PipelineSteps(engine, data, grad_accum, device, set_learning_rate, model_config, pipeline_stages)
    return DataParallelSteps(engine, data, grad_accum, device, set_learning_rate, before_forward, min_confidence)
