"""Exit rules: given the head logits of the active tokens after a layer, which of them exit.

A rule is one file in this folder implementing `ExitRule` and one entry in `EXIT_RULES`
(its name is the value of `ElectraExitConfig.exit_criterion`). The threshold tau comes from
the exit controller each step; a rule may read anything else it needs from the model config
when it is built. Pinned tokens and forced exit plans are handled by `ExitDecision`, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .confidence import Confidence
from .prior_margin import PriorMargin

if TYPE_CHECKING:
    from ..config import ElectraExitConfig


class ExitRule(Protocol):
    def __init__(self, config: "ElectraExitConfig") -> None: ...

    def exits(self, head_logits: torch.Tensor, layer_number: int, threshold: float) -> torch.Tensor:
        """Bool per row of `head_logits` (float, one logit per active token after layer `layer_number`)."""
        ...


EXIT_RULES: dict[str, type[ExitRule]] = {"prior_margin": PriorMargin, "confidence": Confidence}


def build_exit_rule(config: "ElectraExitConfig") -> ExitRule:
    return EXIT_RULES[config.exit_criterion](config)


__all__ = ["EXIT_RULES", "ExitRule", "build_exit_rule", "Confidence", "PriorMargin"]
