"""Which discriminator layers each pipeline stage holds.

DeepSpeed's own methods (`parameters`, `uniform`, `type:REGEX`) balance what each stage holds.
With early exit the work is not what a stage holds: a later stage runs a layer only for the
micro-batches that still have an active token there, so it can hold more layers for the same
expected work. Two more methods, both resolved to per-stage layer counts here:

    layers:N0,N1,...   stage s holds N_s discriminator layers (stage 0 also the embeddings and
                       the generator); the counts add up to the discriminator's depth
    expected:PROFILE   counts that balance the *expected* per-micro-batch work, from a JSON
                       profile with measured costs and how often micro-batches reach each layer:
                       {"first_stage_cost": s, "layer_cost": [s, ...], "reach": [p, ...]}
                       (one entry per discriminator layer; `bench/pipeline_skip.py` writes one)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import fsspec


class PartitionError(ValueError):
    """A `--pipeline-partition` value that cannot be used (named in the message)."""


def is_layer_partition(method: str) -> bool:
    return method.startswith(("layers:", "expected:"))


def parse_layer_counts(method: str, num_stages: int, num_layers: int) -> list[int]:
    """Per-stage discriminator layer counts for a `layers:` or `expected:` method."""
    if method.startswith("expected:"):
        return expected_work_partition_from_file(method.split(":", 1)[1], num_stages, num_layers)
    text = method.split(":", 1)[1]
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise PartitionError(f"pipeline_partition={method!r}: expected layers:N0,N1,... with whole numbers") from None
    if len(counts) != num_stages or min(counts) < 1 or sum(counts) != num_layers:
        raise PartitionError(
            f"pipeline_partition={method!r}: expected {num_stages} positive layer counts (one per "
            f"stage) adding up to the discriminator's {num_layers} layers"
        )
    return counts


def expected_work_partition_from_file(path: str, num_stages: int, num_layers: int) -> list[int]:
    try:
        with fsspec.open(path, "r") as handle:
            profile = json.load(handle)
        first, layer_cost, reach = profile["first_stage_cost"], profile["layer_cost"], profile["reach"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PartitionError(
            f"pipeline_partition=expected:{path}: cannot read a profile with first_stage_cost, "
            f"layer_cost and reach there ({error})"
        ) from None
    if len(layer_cost) != num_layers or len(reach) != num_layers:
        raise PartitionError(
            f"pipeline_partition=expected:{path}: the profile has {len(layer_cost)} layer costs and "
            f"{len(reach)} reach values; the discriminator has {num_layers} layers"
        )
    return expected_work_partition(first, layer_cost, reach, num_stages)


def stage_expected_costs(
    counts: Sequence[int], first_stage_cost: float, layer_cost: Sequence[float], reach: Sequence[float]
) -> list[float]:
    """Expected per-micro-batch cost of each stage under `counts`."""
    costs, start = [], 0
    for stage, count in enumerate(counts):
        layers = range(start, start + count)
        costs.append((first_stage_cost if stage == 0 else 0.0) + sum(reach[i] * layer_cost[i] for i in layers))
        start += count
    return costs


def expected_work_partition(
    first_stage_cost: float, layer_cost: Sequence[float], reach: Sequence[float], num_stages: int
) -> list[int]:
    """Layer counts per stage that minimise the largest expected stage cost (ties: the most even counts).

    A stage runs a layer only for micro-batches with an active token entering it (probability
    `reach[l]`); stage 0 also pays `first_stage_cost` (embeddings, generator, sampling) for all.
    """
    num_layers = len(layer_cost)
    if not 1 <= num_stages <= num_layers:
        raise PartitionError(f"cannot split {num_layers} layers into {num_stages} stages")
    best, best_key = None, None
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        counts = [bounds[i + 1] - bounds[i] for i in range(num_stages)]
        key = (max(stage_expected_costs(counts, first_stage_cost, layer_cost, reach)), max(counts) - min(counts))
        if best_key is None or key < best_key:
            best, best_key = counts, key
    return best
