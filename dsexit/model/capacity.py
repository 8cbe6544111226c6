"""Capacity routing: after each exit head a fixed number of rows per sequence continue.

The least confident rows under the exit rule continue (`exit_routing="capacity"`), or rows drawn at
random (`"random"`, DeepSpeed random-LTD's rule, a control); the rest exit with the head's logit as
their RTD output. Pinned tokens ([CLS], [SEP]) continue first and padding last, so the exitable
tokens compete for the rest.

Shapes are static. A `CapacitySchedule` names, for each exit head, how many rows continue in
sixteenths of the sequence (`BUCKETS`): Python ints, so a compiled step has one graph per schedule,
and a run meets a handful of them whatever its data. The controller steers one knob, a level
(`CapacitySchedule.at_level`: level k plans about k/16 of the full depth's token-layers). Routing
itself reads nothing back from the device: each exit head sorts its layer's running rows once (the
least confident first) and keeps a prefix, so later layers run on a shrinking prefix of slices; the
rows that left wait in slot order, and the sequence order is restored once, after the last layer.

Under `exit_kv="keep"` the rows that left stay visible as keys and values (their frozen states
after the prefix, padding masked in the same order); under `"drop"` each layer attends within its
prefix alone. Attention has no notion of order beyond the position embeddings added before the first
layer, so reordering the rows changes no result.

Two measurements feed the controller's floor (`ExitState.forced_exits`, `ExitState.floor_counts`):
the exitable tokens that left below `min_confidence` (forced out), and, per exit head, how many
exitable tokens reached it without having reached the floor before and how many of them reach it
there (`floor_compute` turns these into the compute a threshold at the floor would spend).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ElectraExitConfig
from .flops import LayerWork
from .layers import TokenRouting

if TYPE_CHECKING:
    from .discriminator import ExitDecision, ExitState

BUCKETS = 16
"""Capacities are multiples of seq_len / BUCKETS (rounded up to whole rows)."""
LEVELS = BUCKETS
"""The controller's knob runs over levels 1..LEVELS; LEVELS is full depth."""


def planned_compute(exit_layers: tuple[int, ...], num_layers: int, shares: tuple[float, ...]) -> float:
    """Token-layers per token over full depth when `shares[i]` of a sequence's rows continue after exit
    layer `exit_layers[i]` (every row runs the layers up to the first exit head)."""
    continuing = dict(zip(exit_layers, shares))
    running, total = 1.0, 0.0
    for number in range(1, num_layers + 1):
        total += running
        running = continuing.get(number, running)
    return total / num_layers


@torch.compiler.assume_constant_result
def _level_buckets(exit_layers: tuple[int, ...], num_layers: int, level: int) -> tuple[int, ...]:
    """The schedule of `level` (a compiled forward takes it as a constant of its Python arguments)."""
    return _solve_level(exit_layers, num_layers, level)


@functools.lru_cache(maxsize=None)
def _solve_level(exit_layers: tuple[int, ...], num_layers: int, level: int) -> tuple[int, ...]:
    """The same share of the running rows leaves at every exit head (a geometric decay, its ratio found by
    bisection so that the unrounded plan is level/LEVELS), rounded to buckets, at least one."""
    if level >= LEVELS:
        return (BUCKETS,) * len(exit_layers)

    def shares(ratio: float) -> tuple[float, ...]:
        return tuple(ratio**index for index in range(1, len(exit_layers) + 1))

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if planned_compute(exit_layers, num_layers, shares(middle)) < level / LEVELS:
            low = middle
        else:
            high = middle
    return tuple(max(1, round(BUCKETS * share)) for share in shares(high))


@dataclass(frozen=True)
class CapacitySchedule:
    """Rows per sequence that continue after each exit head, in sixteenths of the sequence."""

    exit_layers: tuple[int, ...]
    buckets: tuple[int, ...]  # per exit layer, non-increasing, in 1..BUCKETS

    @classmethod
    def at_level(cls, config: ElectraExitConfig, level: int) -> "CapacitySchedule":
        """The controller's schedule at `level` (1..LEVELS): it plans about level/LEVELS of full depth's
        token-layers (never below what one bucket after every head plans); LEVELS is full depth."""
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= LEVELS:
            raise ValueError(f"exit capacity level {level!r} is invalid; expected a whole number in [1, {LEVELS}].")
        layers = tuple(config.exit_layers)
        return cls(layers, _level_buckets(layers, config.num_hidden_layers, level))

    @classmethod
    def after_layers(cls, config: ElectraExitConfig, shares: Mapping[int, float]) -> "CapacitySchedule":
        """Named exit layers keep `shares[layer]` of the sequence (rounded to buckets, at least one);
        the others keep what the head before them kept (all rows before the first named one)."""
        layers = tuple(config.exit_layers)
        unknown = sorted(set(shares) - set(layers))
        if unknown:
            raise ValueError(f"exit capacity names layer(s) {unknown} without an exit head; expected some of {layers}.")
        buckets, current = [], BUCKETS
        for number in layers:
            if number in shares:
                share = shares[number]
                if not 0.0 < share <= 1.0:
                    raise ValueError(f"exit capacity {share!r} after layer {number} is invalid; expected (0, 1].")
                current = min(current, max(1, round(BUCKETS * share)))
            buckets.append(current)
        return cls(layers, tuple(buckets))

    def rows_after(self, layer_number: int, seq_len: int) -> int:
        """Rows of each sequence that continue after the head of `layer_number`."""
        buckets = self.buckets[self.exit_layers.index(layer_number)]
        return min(seq_len, math.ceil(buckets * seq_len / BUCKETS))

    def planned_compute(self, num_layers: int) -> float:
        return planned_compute(self.exit_layers, num_layers, tuple(b / BUCKETS for b in self.buckets))


def capacity_schedule(
    config: ElectraExitConfig, capacity: "int | Mapping[int, float] | CapacitySchedule"
) -> CapacitySchedule:
    """A schedule from the forward's `exit_capacity`: a level, shares after named exit layers, or a schedule."""
    if isinstance(capacity, CapacitySchedule):
        return capacity
    if isinstance(capacity, Mapping):
        return CapacitySchedule.after_layers(config, capacity)
    return CapacitySchedule.at_level(config, capacity)


def floor_compute(reaching: list[float], confident: list[float], config: ElectraExitConfig) -> float:
    """The compute threshold routing at tau = min_confidence would spend, from per-layer counts (index
    layer - 1): exitable tokens that reached an exit head below the floor so far, and those of them at
    or above it there. Each head lets out its measured share of them (1.0: no head's tokens reach it)."""
    survivals, surviving = [], 1.0
    for number in config.exit_layers:
        reached = reaching[number - 1]
        surviving *= 1.0 - (confident[number - 1] / reached if reached > 0 else 0.0)
        survivals.append(surviving)
    return planned_compute(tuple(config.exit_layers), config.num_hidden_layers, tuple(survivals))


@dataclass
class LeftRows:
    """Rows that left at one exit head, in slot order: their frozen states and their RTD logits."""

    hidden: torch.Tensor  # [B, n, H]
    position: torch.Tensor  # long [B, n]: position in the sequence
    real: torch.Tensor  # bool [B, n]
    logits: torch.Tensor  # float [B, n]
    layer_number: int


@dataclass
class PrefixRows:
    """Every sequence's rows in the capacity routing's slot order: slots 0..P-1 still run, and the rows
    that left follow them, the latest first (`left`). Per-row facts move with the rows."""

    hidden: torch.Tensor  # [B, P, H]: the newest states of the running rows
    position: torch.Tensor  # long [B, P]
    real: torch.Tensor  # bool [B, P]: not padding
    exitable: torch.Tensor  # bool [B, P]: real and not pinned
    confident: torch.Tensor  # bool [B, P]: reached the floor at an earlier exit head
    labels: torch.Tensor | None  # float [B, P]
    padded: bool  # whether the batch has padding (attention needs a key mask)
    left: list[LeftRows] = field(default_factory=list)

    @classmethod
    def start(cls, state: "ExitState", hidden: torch.Tensor) -> "PrefixRows":
        batch, seq_len = state.attention_mask.shape
        position = torch.arange(seq_len, device=hidden.device).expand(batch, seq_len)
        return cls(
            hidden=hidden,
            position=position,
            real=state.attention_mask,
            exitable=state.exitable,
            confident=torch.zeros_like(state.exitable),
            labels=state.labels,
            padded=state.padding_mask is not None,
        )

    def reorder(self, order: torch.Tensor) -> None:
        """Put the running rows in `order` (long [B, P], a permutation of each sequence's slots)."""
        width = self.hidden.shape[-1]
        self.hidden = self.hidden.gather(1, order[..., None].expand(-1, -1, width))
        self.position, self.real = self.position.gather(1, order), self.real.gather(1, order)
        self.exitable, self.confident = self.exitable.gather(1, order), self.confident.gather(1, order)
        if self.labels is not None:
            self.labels = self.labels.gather(1, order)

    def keep(self, rows: int, logits: torch.Tensor, layer_number: int) -> None:
        """The first `rows` slots continue; the others leave after `layer_number` with their `logits`."""
        self.left.insert(
            0,
            LeftRows(
                self.hidden[:, rows:], self.position[:, rows:], self.real[:, rows:], logits[:, rows:], layer_number
            ),
        )
        self.hidden, self.position, self.real = self.hidden[:, :rows], self.position[:, :rows], self.real[:, :rows]
        self.exitable, self.confident = self.exitable[:, :rows], self.confident[:, :rows]
        if self.labels is not None:
            self.labels = self.labels[:, :rows]

    def key_mask(self, keys: int) -> torch.Tensor | None:
        """bool [B, keys]: which of the first `keys` slots are real (None: no padding)."""
        if not self.padded:
            return None
        return torch.cat([self.real, *(rows.real for rows in self.left)], dim=1)[:, :keys]

    def all_slots(self, running: torch.Tensor, of_left) -> torch.Tensor:
        """`running` ([B, P, ...]) followed by `of_left(rows)` for every group that left: every slot."""
        return torch.cat([running, *(of_left(rows) for rows in self.left)], dim=1)

    def in_sequence_order(self, slots: torch.Tensor) -> torch.Tensor:
        """A [B, T] or [B, T, H] tensor in slot order, back in sequence order: one scatter."""
        positions = self.all_slots(self.position, lambda rows: rows.position)
        if slots.dim() == 3:
            positions = positions[..., None].expand(-1, -1, slots.shape[-1])
        return torch.empty_like(slots).scatter(1, positions, slots)

    @property
    def sequence_hidden(self) -> torch.Tensor:
        """[B, T, H]: every token's newest state, in sequence order."""
        return self.in_sequence_order(self.all_slots(self.hidden, lambda rows: rows.hidden))


def run_capacity_layer(
    layer: nn.Module,
    head: nn.Module | None,
    layer_number: int,
    config: ElectraExitConfig,
    state: "ExitState",
    decision: "ExitDecision",
) -> "ExitState":
    """One discriminator layer and its head under capacity routing, from the first exit head's layer on
    (layers before it run dense, as every routing does)."""
    batch, seq_len = state.attention_mask.shape
    drop = config.exit_kv == "drop"
    rows = state.prefix
    if rows is None:  # the first exit head's layer: every position, then the running rows start here
        state.hidden, _ = layer(state.hidden, TokenRouting.all_positions(state.padding_mask))
        rows = state.prefix = PrefixRows.start(state, state.stored_hidden)
        running, keys = seq_len, seq_len
        token_layers = state.exitable.sum()
    else:
        running = rows.hidden.shape[1]
        keys = running if drop or not rows.left else seq_len
        rows.hidden = _prefix_layer(layer, rows, keys)
        token_layers = rows.exitable.sum()
    work = LayerWork(
        token_layers=token_layers,
        rows=batch * running,
        key_value_rows=batch * keys,
        query_slots=batch * running,
        key_length=keys,
        head_rows=batch * running if head is not None else 0,
    )
    if layer_number == config.num_hidden_layers:
        _finish(head(rows.hidden).float(), state, layer_number)
    elif head is not None:
        work.head_kind = config.exit_head
        _capacity_head(head, layer_number, config, state, decision)
    state.work.append(work)
    return state


def _prefix_layer(layer: nn.Module, rows: PrefixRows, keys: int) -> torch.Tensor:
    """New states [B, P, H] of the running rows; their queries attend to the first `keys` slots (the
    running rows alone, or every row: those that left keep their frozen states)."""
    batch, running, width = rows.hidden.shape
    key_mask = rows.key_mask(keys)
    if keys == running:
        if key_mask is not None:
            # Slot 0 is real in every sequence with a real token (padding sorts last); one visible key
            # keeps an all-padding row from producing NaN.
            key_mask = torch.cat([torch.ones_like(key_mask[:, :1]), key_mask[:, 1:]], dim=1)
        updated, _ = layer(rows.hidden, TokenRouting.all_positions(key_mask))
        return updated
    every_row = rows.all_slots(rows.hidden, lambda left: left.hidden)
    _, updated = layer(every_row, TokenRouting.all_positions(key_mask), prefix=running)
    return updated.view(batch, running, width)


def _capacity_head(
    head: nn.Module, layer_number: int, config: ElectraExitConfig, state: "ExitState", decision: "ExitDecision"
) -> None:
    rows = state.prefix
    batch, running = rows.real.shape
    continuing = min(running, decision.capacity.rows_after(layer_number, state.attention_mask.shape[1]))
    head_logits = head(rows.hidden).float()
    confidence = decision.rule.confidence(head_logits, layer_number)
    reaches_floor = confidence >= decision.min_confidence
    unconfident = rows.exitable & ~rows.confident
    state.floor_counts[layer_number] = (unconfident.sum(), (unconfident & reaches_floor).sum())
    rows.confident = rows.confident | reaches_floor
    leaving = torch.zeros_like(rows.real)
    if continuing < running:
        draw = torch.rand(confidence.shape, device=confidence.device) if decision.random else confidence
        # Pinned tokens first, then the exitable ones, least confident (or first drawn) first, padding last.
        priority = torch.where(rows.exitable, -draw, torch.where(rows.real, 2.0, -2.0))
        order = priority.argsort(dim=1, descending=True, stable=True)
        rows.reorder(order)
        head_logits, confidence = head_logits.gather(1, order), confidence.gather(1, order)
        leaving = torch.arange(running, device=order.device).expand(batch, running) >= continuing
        forced = rows.exitable & leaving & (confidence < decision.min_confidence)
        state.forced_exits = state.forced_exits + forced.sum()
    if rows.labels is not None:
        weights = rows.real
        if config.exit_supervision < 1.0 and torch.is_grad_enabled():
            # Deep supervision on a sample; the rows leaving here always train the head (their logit is
            # their RTD output).
            weights = weights & ((torch.rand(weights.shape, device=weights.device) < config.exit_supervision) | leaving)
        per_token = F.binary_cross_entropy_with_logits(head_logits, rows.labels, reduction="none")
        weights = weights.float()
        state.aux_loss = state.aux_loss + (per_token * weights).sum() / weights.sum().clamp(min=1.0)
    if continuing < running:
        rows.keep(continuing, head_logits, layer_number)


def _finish(final_logits: torch.Tensor, state: "ExitState", num_layers: int) -> None:
    """The last layer's head gave the running rows' logits: every token's logit, exit layer and state go
    back to sequence order (logits and layers now; states when `ExitState.hidden` is read)."""
    rows = state.prefix
    state.logits = rows.in_sequence_order(rows.all_slots(final_logits, lambda left: left.logits))
    layers = rows.all_slots(
        torch.full_like(rows.position, num_layers), lambda left: torch.full_like(left.position, left.layer_number)
    )
    state.exit_layer = torch.where(state.attention_mask, rows.in_sequence_order(layers), 0)
    state.active = torch.zeros_like(state.active)
