"""The two kernels a platform may replace: dropout and attention.

Defaults are torch's own (`F.dropout`, `F.scaled_dot_product_attention`): they run on every
device and compile with `fullgraph=True, dynamic=False`. A platform's set-up may fill these
slots once at start-up (on a CPU, `dsexit.cpu.tune_process`); the layers call whatever is here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def torch_dropout(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return inputs
    return F.dropout(inputs, p, training=True)


def torch_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """[B, heads, L, d] queries against [B, heads, K, d] keys; `key_mask` bool [B, 1, 1, K] or None."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout_p)


class _Slots:
    dropout: Callable[[torch.Tensor, float, bool], torch.Tensor] = staticmethod(torch_dropout)
    attention: Callable[..., torch.Tensor] = staticmethod(torch_attention)


active = _Slots()


def use(dropout: Callable | None = None, attention: Callable | None = None) -> None:
    """Replace the dropout and/or attention kernel for this process."""
    if dropout is not None:
        active.dropout = dropout
    if attention is not None:
        active.attention = attention


def use_defaults() -> None:
    active.dropout, active.attention = torch_dropout, torch_attention


def uses_defaults() -> bool:
    """True when both slots hold torch's kernels (what `torch.compile(fullgraph=True)` needs)."""
    return active.dropout is torch_dropout and active.attention is torch_attention
