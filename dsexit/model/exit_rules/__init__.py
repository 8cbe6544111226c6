"""Exit rules: given the head logits of the tokens that reached an exit head, how confident each is.

A rule is one file in this folder implementing `ExitRule` and one entry in `EXIT_RULES`
(its name is the value of `ElectraExitConfig.exit_criterion`). Routing reads the confidence:
threshold routing lets a token exit when it reaches tau (from the exit controller each step);
capacity routing lets the least confident tokens continue and the rest exit. A rule may read
anything else it needs from the model config when it is built. Pinned tokens and forced exit
plans are handled by `ExitDecision`, not here.
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

    def confidence(self, head_logits: torch.Tensor, layer_number: int) -> torch.Tensor:
        """Float in [0, 1] per row of `head_logits` (one logit per token after layer `layer_number`),
        detached: routing decisions carry no gradient."""
        ...


EXIT_RULES: dict[str, type[ExitRule]] = {"prior_margin": PriorMargin, "confidence": Confidence}


def build_exit_rule(config: "ElectraExitConfig") -> ExitRule:
    return EXIT_RULES[config.exit_criterion](config)


__all__ = ["EXIT_RULES", "ExitRule", "build_exit_rule", "Confidence", "PriorMargin"]
