"""What one optimizer step measured, summed over micro-batches and data-parallel ranks.

Owns the single per-step collective the trainer adds to DeepSpeed's: one all-reduce
of a float64 vector (losses, accuracy, token-layer counts, exit-layer histogram, and
the stop votes - preemption, time limit - so every rank stops at the same step) and one
all-gather of per-sample fingerprints. The fingerprints give a step digest that does
not depend on the world size: the same global samples give the same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

_SCALARS = (
    "generator_loss",
    "discriminator_loss",
    "loss",
    "rtd_accuracy",
    "micro_batches",
    "tokens_executed",
    "tokens_full",
    "real_tokens",
    "stop_preempted",
    "stop_time_limit",
    "minutes",
)
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


class StepStats:
    """Accumulates one rank's micro-batches of a step; `reduce()` combines all ranks (a collective)."""

    def __init__(self, num_layers: int):
        self.values = dict.fromkeys(_SCALARS, 0.0)
        self.exit_layer_counts = torch.zeros(num_layers, dtype=torch.float64)
        self.fingerprints: list[torch.Tensor] = []

    def add(self, output, batch: dict[str, torch.Tensor]) -> None:
        values = self.values
        values["generator_loss"] += float(output.generator_loss)
        values["discriminator_loss"] += float(output.discriminator_loss)
        values["loss"] += float(output.loss.detach())
        values["rtd_accuracy"] += float(output.rtd_accuracy)
        values["micro_batches"] += 1
        values["tokens_executed"] += float(output.tokens_executed)
        values["tokens_full"] += float(output.tokens_full)
        values["real_tokens"] += float(batch["attention_mask"].sum())
        self.exit_layer_counts += output.exit_layer_counts.detach().cpu().double()
        self.fingerprints.append(sample_fingerprints(batch["input_ids"]))

    def reduce(
        self, *, preempted: bool, time_limit: bool, minutes: float = 0.0, device: torch.device | str = "cpu"
    ) -> StepSummary:
        """Combine all ranks; `device` is where the backend's collectives run (CUDA for NCCL)."""
        self.values["stop_preempted"], self.values["stop_time_limit"] = float(preempted), float(time_limit)
        self.values["minutes"] = minutes
        vector = torch.cat(
            [torch.tensor([self.values[name] for name in _SCALARS], dtype=torch.float64), self.exit_layer_counts]
        )
        fingerprints = torch.cat(self.fingerprints)
        if dist.is_initialized() and dist.get_world_size() > 1:
            vector, fingerprints = vector.to(device), fingerprints.to(device)
            dist.all_reduce(vector)
            gathered = [torch.empty_like(fingerprints) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, fingerprints)
            vector, fingerprints = vector.cpu(), torch.cat(gathered).cpu()
        totals = dict(zip(_SCALARS, vector[: len(_SCALARS)].tolist()))
        counts = vector[len(_SCALARS) :]
        micro_batches = max(totals["micro_batches"], 1.0)
        digest = hashlib.blake2b(fingerprints.sort().values.numpy().tobytes(), digest_size=8).hexdigest()
        return StepSummary(
            generator_loss=totals["generator_loss"] / micro_batches,
            discriminator_loss=totals["discriminator_loss"] / micro_batches,
            loss=totals["loss"] / micro_batches,
            rtd_accuracy=totals["rtd_accuracy"] / micro_batches,
            compute_fraction=totals["tokens_executed"] / max(totals["tokens_full"], 1.0),
            exit_layer_counts=[int(count) for count in counts.tolist()],
            real_tokens=int(totals["real_tokens"]),
            samples_digest=digest,
            stop_preempted=totals["stop_preempted"] > 0,
            stop_time_limit=totals["stop_time_limit"] > 0,
            minutes=totals["minutes"],
        )
