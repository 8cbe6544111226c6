"""Optimizer parameter groups, shared by pre-training (`engine.py`) and fine-tuning (`dsexit.eval`).

ELECTRA's rule: no weight decay on biases and LayerNorm parameters (any parameter with fewer
than two dimensions, or a LayerNorm by name); frozen parameters join no group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def decays(name: str, parameter: torch.Tensor) -> bool:
    """Whether weight decay applies to this parameter."""
    return not (parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)


def parameter_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    lr_for: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """One group per (learning rate, decays or not), in order of first appearance.

    `lr_for(name)` gives a parameter its own learning rate (fine-tuning's layer-wise decay);
    without it the groups carry no "lr" and take the optimizer's.
    """
    groups: dict[tuple[float | None, bool], dict[str, Any]] = {}
    if lr_for is None:  # the decayed group first, as DeepSpeed's checkpoints of earlier runs list them
        groups[(None, True)] = {"params": [], "weight_decay": weight_decay}
        groups[(None, False)] = {"params": [], "weight_decay": 0.0}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        lr, decayed = (None if lr_for is None else lr_for(name)), decays(name, parameter)
        group = groups.setdefault(
            (lr, decayed),
            {"params": [], "weight_decay": weight_decay if decayed else 0.0, **({} if lr is None else {"lr": lr})},
        )
        group["params"].append(parameter)
    return list(groups.values())
