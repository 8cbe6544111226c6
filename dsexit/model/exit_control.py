"""The exit controller: which threshold tau the model uses at each step.

No exit during `warmup_steps` (the heads train meanwhile). After that, tau is either
fixed (the model's `exit_threshold`) or, with `target_compute` set, steered toward it: an integral
controller in logit(tau) space. Executing more than the target (too few exits) lowers tau;
executing less raises it. Logit space keeps steps proportionate near tau = 1, where
confidence saturates. The controller is `Stateful`: checkpoints save and restore it.

A steered tau never falls below `min_confidence`. Heads that know little (a discriminator still at the
replaced-token prior) give every token a confidence near 0; without a floor the controller
would chase the target down to such a tau and tokens would leave knowing nothing. At the
floor, compute stays above the target and `at_floor` says why.
"""

from __future__ import annotations

import math

from .config import ElectraExitConfig

# logit(tau) bounds: tau from ~0.0003 to 1 - 6e-6. Confidence |2p-1| reaches 1 - 6e-6
# only at |logit| ~ 12.7, so the upper bound means "almost never exit".
_MIN_LOGIT, _MAX_LOGIT = -8.0, 12.0


def _logit(probability: float) -> float:
    probability = min(max(probability, 1e-12), 1 - 1e-12)
    return math.log(probability / (1 - probability))


class ExitController:
    """tau per step. Its settings are training settings (`dsexit.train.config.train_config.ExitControlConfig`, whose
    `min_confidence` the trainer passes); the model config gives whether exits are on and tau's start.
    Built directly, it has no floor (`min_confidence=0`), as speed benchmarks that steer untrained heads
    to a compute target need."""

    def __init__(
        self,
        config: ElectraExitConfig,
        target_compute: float | None = None,
        controller_gain: float = 4.0,
        warmup_steps: int = 0,
        min_confidence: float = 0.0,
    ):
        self.enabled = config.exit_enabled
        self.warmup_steps = warmup_steps
        self.target_compute = target_compute
        self.gain = controller_gain
        self.min_confidence = min_confidence
        # The floor bounds where the controller steers; a fixed tau (no target) is the user's own.
        # Where min_confidence is 0 the floor is the controller's own lower bound.
        floored = target_compute is not None and min_confidence > 0
        self.floor_logit = max(_logit(min_confidence), _MIN_LOGIT) if floored else _MIN_LOGIT
        self.threshold_logit = self._clamp(_logit(config.exit_threshold))
        self.updates = 0
        self.last_compute_fraction: float | None = None

    def _clamp(self, threshold_logit: float) -> float:
        return min(max(threshold_logit, self.floor_logit), _MAX_LOGIT)

    @property
    def tau(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.threshold_logit))

    @property
    def at_floor(self) -> bool:
        """Whether tau sits at `min_confidence`: the heads are not confident enough to reach the
        target, so compute stays above it."""
        return self.floor_logit > _MIN_LOGIT and self.threshold_logit <= self.floor_logit

    def threshold(self, step: int) -> float | None:
        """tau for optimizer step `step` (0-based), or None when no token may exit."""
        if not self.enabled or step < self.warmup_steps:
            return None
        return self.tau

    def update(self, compute_fraction: float, step: int | None = None) -> None:
        """Feed back the (data-parallel averaged) compute fraction executed at `step`.

        Steps without exits (warmup, exits off) leave tau unchanged.
        """
        self.last_compute_fraction = compute_fraction
        exiting = self.enabled if step is None else self.threshold(step) is not None
        if self.target_compute is None or not exiting:
            return
        error = compute_fraction - self.target_compute
        self.threshold_logit = self._clamp(self.threshold_logit - self.gain * error)
        self.updates += 1

    def state_dict(self) -> dict:
        return {
            "threshold_logit": self.threshold_logit,
            "updates": self.updates,
            "last_compute_fraction": self.last_compute_fraction,
            "min_confidence": self.min_confidence,
        }

    def load_state_dict(self, state: dict) -> None:
        """The saved tau, raised to this controller's floor (the configured floor wins: a run resumed
        with a higher --min-confidence starts at it; checkpoints from before the floor have none)."""
        self.threshold_logit = self._clamp(float(state["threshold_logit"]))
        self.updates = int(state["updates"])
        self.last_compute_fraction = state.get("last_compute_fraction")
