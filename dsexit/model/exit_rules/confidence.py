"""`confidence`: |2p - 1|, p = sigmoid(head logit), the distance from p = 0.5.

A head at the ~15% replacement prior already reaches 0.70 on every token (see `prior_margin`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ElectraExitConfig


def margin_from(head_logits: torch.Tensor, centre: float) -> torch.Tensor:
    """|2 sigmoid(x - centre) - 1| = |tanh((x - centre) / 2)|, in [0, 1), without saturating sigmoid first."""
    return torch.tanh((head_logits.detach().float() - centre) / 2).abs()


class Confidence:
    def __init__(self, config: "ElectraExitConfig | None" = None):
        pass

    def confidence(self, head_logits: torch.Tensor, layer_number: int) -> torch.Tensor:
        return margin_from(head_logits, 0.0)
