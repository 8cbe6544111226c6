"""The one FLOP counter: what a forward pass really executed, against full depth.

The model records, per layer, how many rows entered each matmul (`LayerWork`); this
module turns those records into token-layers and FLOPs. Nothing here estimates: the
rows are the shapes the layers were called with (a test checks them with hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ElectraExitConfig


@dataclass
class LayerWork:
    """Rows that entered one encoder layer's matmuls, and the attention's extent."""

    # exitable tokens the layer computed a new state for (pinned specials not counted); a device
    # tensor where counting on the host would read the device (dense layers), read once per log line
    token_layers: int | torch.Tensor
    rows: int  # rows into query, attention-output and both feed-forward matmuls
    key_value_rows: int  # rows into the key and value projections
    query_slots: int  # query rows inside scaled-dot-product attention (padded layout)
    key_length: int  # keys each query row is scored against
    head_rows: int = 0  # rows into the exit or discriminator head after this layer
    head_kind: str = "dense"  # "dense" (H->H->1) or "linear" (H->1): `exit_head`; the final head is dense
    head_graph_rows: int = -1  # rows whose head ran with autograd (-1: all head_rows); see `exit_supervision`
    head_rows_rerun: int = 0  # rows whose head forward ran a second time, with autograd (sampled supervision)


@dataclass
class ComputeLog:
    """Everything one forward pass executed; filled in by the model as it runs."""

    batch_size: int = 0
    seq_len: int = 0
    real_tokens: int | torch.Tensor = 0  # a device tensor where counting would read the device
    exitable_tokens: int | torch.Tensor = 0  # real tokens a threshold may let exit (the compute fraction's unit)
    discriminator: list[LayerWork] = field(default_factory=list)
    generator: list[LayerWork] = field(default_factory=list)
    generator_head_rows: int = 0  # rows into the generator's vocabulary projection


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _layer_flops(work: LayerWork, hidden: int, intermediate: int) -> int:
    projections = (
        _linear(work.rows, hidden, hidden) * 2  # query, attention output
        + _linear(work.key_value_rows, hidden, hidden) * 2  # key, value
        + _linear(work.rows, hidden, intermediate) * 2
    )  # feed-forward in and out
    attention = 2 * 2 * work.query_slots * work.key_length * hidden  # scores and weighted sum
    return projections + attention


def _head_flops(rows: int, hidden: int, kind: str = "dense") -> int:
    return (_linear(rows, hidden, hidden) if kind == "dense" else 0) + _linear(rows, hidden, 1)


def _at_least_one(count):
    """max(1, count) for a Python number or a device tensor (a tensor's `max` would read the device)."""
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(1, count)


@dataclass
class FlopReport:
    token_layers_executed: int
    token_layers_full: int
    forward_flops: int
    forward_flops_full: int
    backward_flops: int = -1  # -1: twice the forward (no forward ran without autograd)
    training_flops_full: int = -1  # forward + backward of the same batch at full depth

    @property
    def compute_fraction(self) -> float:
        """Executed discriminator token-layers / token-layers at full depth, over exitable tokens
        (real tokens but the pinned specials, which always run every layer)."""
        return self.token_layers_executed / _at_least_one(self.token_layers_full)

    @property
    def training_flops(self) -> int:
        """Forward + backward (backward = twice the forward of what ran with autograd)."""
        return self.forward_flops + (2 * self.forward_flops if self.backward_flops < 0 else self.backward_flops)

    @property
    def ideal_speedup(self) -> float:
        """Full-depth training FLOPs of the same batch / the executed ones."""
        full = 3 * self.forward_flops_full if self.training_flops_full < 0 else self.training_flops_full
        return full / _at_least_one(self.training_flops)


def full_depth_work(log: ComputeLog, config: ElectraExitConfig) -> ComputeLog:
    """The log the same batch would produce with no token exiting (dense layers)."""
    positions = log.batch_size * log.seq_len
    exit_layers = set(config.exit_layers)
    dense = [
        LayerWork(
            token_layers=log.exitable_tokens,
            rows=positions,
            key_value_rows=positions,
            query_slots=positions,
            key_length=log.seq_len,
            head_rows=positions if number in exit_layers or number == config.num_hidden_layers else 0,
            head_kind=config.exit_head if number in exit_layers else "dense",
        )
        for number in range(1, config.num_hidden_layers + 1)
    ]
    return ComputeLog(
        log.batch_size, log.seq_len, log.real_tokens, log.exitable_tokens, dense, log.generator, log.generator_head_rows
    )


def discriminator_layer_flops(work: LayerWork, config: ElectraExitConfig) -> int:
    """Forward FLOPs of one discriminator layer and the head after it."""
    return _layer_flops(work, config.hidden_size, config.intermediate_size) + _head_flops(
        work.head_rows + work.head_rows_rerun, config.hidden_size, work.head_kind
    )


def discriminator_layer_backward_flops(work: LayerWork, config: ElectraExitConfig) -> int:
    """Backward FLOPs of one layer and its head: twice the forward of what ran with autograd."""
    graph_rows = work.head_rows if work.head_graph_rows < 0 else work.head_graph_rows
    return 2 * (
        _layer_flops(work, config.hidden_size, config.intermediate_size)
        + _head_flops(graph_rows, config.hidden_size, work.head_kind)
    )


def embedding_and_generator_flops(log: ComputeLog, config: ElectraExitConfig) -> int:
    """Forward FLOPs before the first discriminator layer: projections and the generator."""
    total = 0
    embedding_rows = log.batch_size * log.seq_len
    if config.embedding_size != config.hidden_size:
        total += _linear(embedding_rows, config.embedding_size, config.hidden_size)
    if log.generator:
        if config.embedding_size != config.generator_hidden_size:
            total += _linear(embedding_rows, config.embedding_size, config.generator_hidden_size)
        for work in log.generator:
            total += _layer_flops(work, config.generator_hidden_size, config.generator_intermediate_size)
        total += _linear(log.generator_head_rows, config.generator_hidden_size, config.embedding_size)
        total += _linear(log.generator_head_rows, config.embedding_size, config.vocab_size)
    return total


def _forward_flops(log: ComputeLog, config: ElectraExitConfig) -> int:
    return embedding_and_generator_flops(log, config) + sum(
        discriminator_layer_flops(work, config) for work in log.discriminator
    )


def mean_exit_layer(exit_layer_counts) -> float:
    """Mean (1-based) exit layer from per-layer counts of tokens whose last layer it was."""
    counts = [float(count) for count in exit_layer_counts]
    return sum(layer * count for layer, count in enumerate(counts, start=1)) / max(1.0, sum(counts))


def _backward_flops(log: ComputeLog, config: ElectraExitConfig) -> int:
    return 2 * embedding_and_generator_flops(log, config) + sum(
        discriminator_layer_backward_flops(work, config) for work in log.discriminator
    )


def count_flops(log: ComputeLog, config: ElectraExitConfig) -> FlopReport:
    full = full_depth_work(log, config)
    return FlopReport(
        token_layers_executed=sum(work.token_layers for work in log.discriminator),
        token_layers_full=log.exitable_tokens * config.num_hidden_layers,
        forward_flops=_forward_flops(log, config),
        forward_flops_full=_forward_flops(full, config),
        backward_flops=_backward_flops(log, config),
        training_flops_full=_forward_flops(full, config) + _backward_flops(full, config),
    )
