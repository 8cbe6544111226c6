"""What one optimizer step measured, summed over micro-batches and data-parallel ranks.

Owns the single per-step collective the trainer adds to DeepSpeed's: one all-reduce
of a float64 vector (losses, accuracy, token-layer counts, exit-layer histogram, capacity
routing's forced exits and floor counts, and the stop votes - preemption, time limit - so
every rank stops at the same step) and one all-gather of per-sample fingerprints. The
fingerprints give a step digest that does not depend on the world size: the same global
samples give the same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Measured on the device, summed over micro-batches there; then the host's own facts.
_MEASURED = (
    "generator_loss",
    "discriminator_loss",
    "loss",
    "rtd_accuracy",
    "tokens_executed",
    "tokens_full",
    "forced_exits",  # capacity routing's only (0 where an output has none)
)
_HOST = ("micro_batches", "real_tokens", "stop_preempted", "stop_time_limit", "minutes")
_FINGERPRINT_WEIGHTS: dict[int, torch.Tensor] = {}


def sample_fingerprints(input_ids: torch.Tensor) -> torch.Tensor:
    """One int64 per sample, a fixed random projection of its token ids (wrapping arithmetic)."""
    seq_len = input_ids.shape[1]
    if seq_len not in _FINGERPRINT_WEIGHTS:
        generator = torch.Generator().manual_seed(seq_len)
        _FINGERPRINT_WEIGHTS[seq_len] = torch.randint(1, 2**62, (seq_len,), generator=generator, dtype=torch.int64)
    return (input_ids.detach().cpu().long() * _FINGERPRINT_WEIGHTS[seq_len]).sum(dim=1)


@dataclass
class StepSummary:
    generator_loss: float
    discriminator_loss: float
    loss: float
    rtd_accuracy: float
    compute_fraction: float
    exit_layer_counts: list[int]
    real_tokens: int
    samples_digest: str
    stop_preempted: bool
    stop_time_limit: bool
    minutes: float = 0.0  # training wall clock spent by rank 0's clock (others contribute 0)
    stage_counters: list[list[int]] | None = None  # pipeline: per stage [micro_batches, skipped, token_layers]
    forced_exit_share: float = 0.0  # capacity routing: share of exitable tokens forced out below the floor
    # capacity routing, per layer: tokens reaching its exit head below the floor so far, those of them at
    # or above it there (`dsexit.model.capacity.floor_compute`)
    floor_counts: tuple[list[float], list[float]] | None = None


def _on_device(value, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor on `device`: a device tensor stays there (no read); a Python number is
    the threshold path's host count."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class StepStats:
    """Accumulates one rank's micro-batches of a step; `reduce()` combines all ranks (a collective).

    What the model measured stays on the device, summed there, until `reduce` reads the step's one
    vector; what the host knows (real tokens, sample fingerprints) comes from the batch as the
    reader gave it, before it moved to the device."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.measured: torch.Tensor | None = None  # float64 [len(_MEASURED) + 3 x num_layers], on the device
        self.micro_batches = 0
        self.real_tokens = 0
        self.fingerprints: list[torch.Tensor] = []

    def add(self, output, batch: dict[str, torch.Tensor]) -> None:
        """`batch`: the micro-batch on the host, as read (its counts cost no device read)."""
        counts = output.exit_layer_counts.detach().to(torch.float64)
        floor = getattr(output, "floor_counts", None)
        floor = (
            torch.zeros(2 * self.num_layers, dtype=torch.float64, device=counts.device)
            if floor is None
            else floor.detach().to(torch.float64).reshape(-1)
        )
        scalars = torch.stack([_on_device(getattr(output, name, 0), counts.device) for name in _MEASURED])
        measured = torch.cat([scalars, counts, floor])
        self.measured = measured if self.measured is None else self.measured + measured
        self.micro_batches += 1
        self.real_tokens += int(batch["attention_mask"].sum())
        self.fingerprints.append(sample_fingerprints(batch["input_ids"]))

    def reduce(
        self, *, preempted: bool, time_limit: bool, minutes: float = 0.0, device: torch.device | str = "cpu"
    ) -> StepSummary:
        """Combine all ranks; `device` is where the backend's collectives run (CUDA for NCCL). The step's
        one read of the device: the reduced vector (the controller's compute fraction, the stop votes
        and the statistics in one copy) and the gathered fingerprints right after it."""
        host = torch.tensor(
            [self.micro_batches, self.real_tokens, float(preempted), float(time_limit), minutes], dtype=torch.float64
        )
        measured = self.measured
        if measured is None:  # a rank with no micro-batch of its own (a pipeline's first stages)
            measured = torch.zeros(len(_MEASURED) + 3 * self.num_layers, dtype=torch.float64)
        vector = torch.cat([measured, host.to(measured.device, non_blocking=True)])
        fingerprints = torch.cat(self.fingerprints)
        if dist.is_initialized() and dist.get_world_size() > 1:
            vector, fingerprints = vector.to(device), fingerprints.to(device)
            dist.all_reduce(vector)
            gathered = [torch.empty_like(fingerprints) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, fingerprints)
            fingerprints = torch.cat(gathered)
        values = vector.cpu().tolist()
        fingerprints = fingerprints.cpu()
        layers, start = self.num_layers, len(_MEASURED)
        totals = dict(zip(_MEASURED + _HOST, values[:start] + values[start + 3 * layers :]))
        counts, reaching, confident = (values[start + k * layers : start + (k + 1) * layers] for k in range(3))
        micro_batches = max(totals["micro_batches"], 1.0)
        digest = hashlib.blake2b(fingerprints.sort().values.numpy().tobytes(), digest_size=8).hexdigest()
        return StepSummary(
            generator_loss=totals["generator_loss"] / micro_batches,
            discriminator_loss=totals["discriminator_loss"] / micro_batches,
            loss=totals["loss"] / micro_batches,
            rtd_accuracy=totals["rtd_accuracy"] / micro_batches,
            compute_fraction=totals["tokens_executed"] / max(totals["tokens_full"], 1.0),
            exit_layer_counts=[int(count) for count in counts],
            real_tokens=int(totals["real_tokens"]),
            samples_digest=digest,
            stop_preempted=totals["stop_preempted"] > 0,
            stop_time_limit=totals["stop_time_limit"] > 0,
            minutes=totals["minutes"],
            forced_exit_share=totals["forced_exits"] * layers / max(totals["tokens_full"], 1.0),
            floor_counts=(reaching, confident),
        )
