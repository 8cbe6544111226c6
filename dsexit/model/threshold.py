"""Threshold routing (and forced exit plans): after each exit head, each active token leaves when its
confidence reaches tau (or when its plan says so); the next layer computes the tokens left.

The number of rows a layer computes depends on the data: the routing gathers the active tokens by
their mask (`TokenRouting.active_tokens`) and reads the count back from the device once exits are
possible. Before that, every layer is dense (HF's computation) without a read. Under `exit_kv="drop"`
the computed rows are carried from layer to layer (`ExitState.carry`) and exited tokens' rows wait in
`ExitState.deferred`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ElectraExitConfig
from .flops import LayerWork
from .layers import TokenRouting

if TYPE_CHECKING:
    from .discriminator import ExitDecision, ExitState


def pinned_leaving(
    exits: torch.Tensor, rows: torch.Tensor, exitable_rows: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """Bool over the active `rows` (flat positions b*T+t in a [B, T] `shape`): the pinned tokens whose
    sequence has no exitable token still active once `exits` leave. They go with it, the head's logit
    as their RTD output like any exited token's; were they to stay, a sequence would always keep an
    active token and a pipeline stage could never skip a fully exited micro-batch. No host read."""
    batch, seq_len = shape
    sequence = torch.div(rows, seq_len, rounding_mode="floor")
    exitable_staying = torch.zeros(batch, dtype=torch.long, device=rows.device)
    exitable_staying.index_add_(0, sequence, (exitable_rows & ~exits).long())
    return ~exitable_rows & (exitable_staying.index_select(0, sequence) == 0)


def run_threshold_layer(
    layer: nn.Module,
    head: nn.Module | None,
    layer_number: int,
    config: ElectraExitConfig,
    state: "ExitState",
    decision: "ExitDecision",
) -> "ExitState":
    """One discriminator layer and its head on the active tokens of `state`, routed by threshold or plan."""
    dense = state.dense
    if dense:
        routing = TokenRouting.all_positions(state.padding_mask)
    else:
        routing = TokenRouting.active_tokens(
            state.active, state.padding_mask, drop_exited_keys=config.exit_kv == "drop"
        )
    batch, seq_len = state.active.shape
    # Dense before any exit: every exitable token, counted on the device (read once per log line).
    token_layers = state.exitable.sum() if not state.exits_possible else int((state.active & state.exitable).sum())
    if routing.drop_exited_keys:
        # Keys and values are the active rows alone: the new rows go straight to the next layer.
        _, computed = layer(state.stored_hidden, routing, rows=state.active_rows(routing.row_index))
        state.carry(routing.row_index, computed)
    else:
        state.hidden, computed = layer(state.hidden, routing)
    positions = batch * seq_len
    work = LayerWork(
        token_layers=token_layers,
        rows=positions if dense else routing.rows,
        key_value_rows=positions if dense or not routing.drop_exited_keys else routing.rows,
        query_slots=positions if dense else batch * routing.slots,
        key_length=seq_len if dense or not routing.drop_exited_keys else routing.slots,
    )
    if layer_number == config.num_hidden_layers:
        work.head_rows = _final_head(head, state, dense, config.num_hidden_layers, computed)
    elif head is not None:
        work.head_kind = config.exit_head
        work.head_rows, work.head_graph_rows, work.head_rows_rerun = _exit_head(
            head, layer_number, state, decision, computed, config.exit_supervision
        )
    state.work.append(work)
    return state


def _active_rows(state: ExitState, computed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of the active tokens, their hidden rows). The layer just computed `computed`: every
    position when dense, else exactly the active tokens in index order; only a dense layer over padding
    leaves rows to pick (every other time no gather, and no full-size scatter in its backward)."""
    rows = state.active.reshape(-1).nonzero().squeeze(1)
    return rows, computed if computed.shape[0] == rows.numel() else computed.index_select(0, rows)


def _exit_head(
    head: nn.Module,
    layer_number: int,
    state: ExitState,
    decision: ExitDecision,
    computed: torch.Tensor,
    supervision: float = 1.0,
) -> tuple[int, int, int]:
    """Run `head` on the active tokens; returns (rows, rows run with autograd, rows run twice)."""
    if decision.may_exit:
        state.exits_possible = True
    elif state.dense and not (state.labels is not None and supervision < 1.0 and torch.is_grad_enabled()):
        return _dense_exit_head(head, state, computed)
    rows, hidden_rows = _active_rows(state, computed)
    sampled = state.labels is not None and supervision < 1.0 and torch.is_grad_enabled()
    if sampled:
        # Deep supervision on a sample: the head's forward on the other rows runs without
        # autograd; rows that exit are re-run with it below (their logit is their RTD output).
        with torch.no_grad():
            head_logits = head(hidden_rows).float()
        supervised = torch.rand(rows.shape, device=rows.device) < supervision
    else:
        head_logits = head(hidden_rows).float()
    exits = decision.exits(layer_number, head_logits, rows, state.exitable)
    graph_count, rerun = -1, 0
    if sampled:
        graph_rows = (supervised | exits).nonzero().squeeze(1)
        graph_count = rerun = int(graph_rows.numel())
        head_logits = head_logits.index_put((graph_rows,), head(hidden_rows.index_select(0, graph_rows)).float())
    if state.labels is not None:
        targets = state.labels.reshape(-1).index_select(0, rows)
        if sampled:  # the head learns from the sampled tokens
            picked = supervised.nonzero().squeeze(1)
            head_loss = (
                F.binary_cross_entropy_with_logits(head_logits.index_select(0, picked), targets.index_select(0, picked))
                if picked.numel()
                else head_logits.sum() * 0.0
            )
        else:  # deep supervision: the head learns from every token that reaches it
            head_loss = F.binary_cross_entropy_with_logits(head_logits, targets) if rows.numel() else head_logits.sum()
        state.aux_loss = state.aux_loss + head_loss
    exiting_rows = rows[exits]
    state.logits = state.logits.reshape(-1).index_put((exiting_rows,), head_logits[exits]).view_as(state.logits)
    flat_exit_layer = state.exit_layer.reshape(-1).clone()
    flat_exit_layer[exiting_rows] = layer_number
    state.exit_layer = flat_exit_layer.view_as(state.exit_layer)
    flat_active = state.active.reshape(-1).clone()
    flat_active[exiting_rows] = False
    if state.carries_active:
        state.retire(exits, flat_active.view_as(state.active))
    else:
        state.active = flat_active.view_as(state.active)
    return int(rows.numel()), graph_count, rerun


def _dense_exit_head(head: nn.Module, state: ExitState, computed: torch.Tensor) -> tuple[int, int, int]:
    """An exit head where no token can leave (exits off, or before the controller's warm-up ends):
    every position, padding included, with deep supervision on the real tokens; static shapes."""
    head_logits = head(computed).float()
    if state.labels is not None:
        real = state.attention_mask.reshape(-1).float()
        per_token = F.binary_cross_entropy_with_logits(head_logits, state.labels.reshape(-1), reduction="none")
        state.aux_loss = state.aux_loss + (per_token * real).sum() / real.sum().clamp(min=1.0)
    return head_logits.shape[0], -1, 0


def _final_head(head: nn.Module, state: ExitState, dense: bool, num_layers: int, computed: torch.Tensor) -> int:
    if dense:
        # Every position, padding included, exactly as ElectraForPreTraining. `where` rather
        # than replacement keeps the incoming logits in the graph (a pipeline stage must
        # return a gradient for every float tensor it received).
        state.logits = torch.where(state.exit_layer == 0, head(state.hidden).float(), state.logits)
        rows = state.attention_mask.numel()
    else:
        active_rows, hidden_rows = _active_rows(state, computed)
        head_logits = head(hidden_rows).float()
        state.logits = state.logits.reshape(-1).index_put((active_rows,), head_logits).view_as(state.logits)
        rows = int(active_rows.numel())
    state.exit_layer = torch.where(state.active, torch.full_like(state.exit_layer, num_layers), state.exit_layer)
    state.active = torch.zeros_like(state.active)
    return rows
