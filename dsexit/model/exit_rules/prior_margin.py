"""`prior_margin` (the default): confidence |tanh((x - x0) / 2)|.

x0 = logit(mask_prob) is the replacement prior's log-odds. A head that predicts the base rate
for every token (what an untrained or collapsed head does) has confidence 0 and lets nothing
exit under a threshold, however low tau goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .confidence import margin_from

if TYPE_CHECKING:
    from ..config import ElectraExitConfig


class PriorMargin:
    def __init__(self, config: "ElectraExitConfig"):
        self.prior_logit = config.prior_logit

    def confidence(self, head_logits: torch.Tensor, layer_number: int) -> torch.Tensor:
        return margin_from(head_logits, self.prior_logit)
