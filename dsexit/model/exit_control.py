"""The exit controllers: which threshold tau (threshold routing) or which capacity level (capacity
routing) the model uses at each step. `exit_controller_for` builds the one the model's
`exit_routing` needs; both are `Stateful` and share a floor, `min_confidence`.

Threshold routing (`ExitController`): no exit during `warmup_steps` (the heads train meanwhile).
After that, tau is either fixed (the model's `exit_threshold`) or, with `target_compute` set,
steered toward it: an integral controller in logit(tau) space. Executing more than the target
(too few exits) lowers tau; executing less raises it. Logit space keeps steps proportionate near
tau = 1, where confidence saturates.

A steered tau never falls below `min_confidence`. Heads that know little (a discriminator still at the
replaced-token prior) give every token a confidence near 0; without a floor the controller
would chase the target down to such a tau and tokens would leave knowing nothing. At the
floor, compute stays above the target and `at_floor` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .capacity import LEVELS, CapacitySchedule, floor_compute
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

    def capacity(self, step: int) -> None:
        """No capacity level: threshold routing decides by tau."""
        return None

    def update(self, compute_fraction: float, step: int | None = None, floor_counts=None) -> None:
        """Feed back the (data-parallel averaged) compute fraction executed at `step` (`floor_counts`,
        capacity routing's measurement, is not needed: tau itself never goes below the floor).

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


@dataclass
class _Window:
    """What the steps since the capacity level last had a chance to change measured."""

    steps: int = 0
    compute: float = 0.0
    reaching: list[float] = field(default_factory=list)
    confident: list[float] = field(default_factory=list)

    def add(self, compute_fraction: float, floor_counts: tuple[list[float], list[float]] | None) -> None:
        self.steps += 1
        self.compute += compute_fraction
        if floor_counts is not None:
            reaching, confident = floor_counts
            self.reaching = [a + b for a, b in zip(self.reaching or [0.0] * len(reaching), reaching)]
            self.confident = [a + b for a, b in zip(self.confident or [0.0] * len(confident), confident)]


class CapacityController:
    """The capacity level per step under capacity (or random) routing (`capacity.py`).

    One knob, the level: level k's schedule plans about k/16 of full depth's token-layers. The level
    starts at full depth and changes at most once every `interval` steps with exits on, from what those
    steps measured: the mean compute fraction, and what the floor allows (`capacity.floor_compute`: the
    compute a threshold at `min_confidence` would spend, from the share of tokens each exit head finds
    at or above the floor). The goal is max(target_compute, the floor's allowance); the new level is
    the one whose plan, moved by the window's difference between executed and planned compute (pinned
    tokens run every layer, padding fills capacity), comes nearest the goal without falling below the
    floor's allowance. Heads at the replaced-token prior find no token above the floor, so the level
    stays at full depth whatever the target (`at_floor` says why). Levels with the same schedule are
    never both visited: a compiled step compiles once per level it visits.
    """

    def __init__(
        self,
        config: ElectraExitConfig,
        target_compute: float | None = None,
        warmup_steps: int = 0,
        min_confidence: float = 0.0,
        interval: int = 50,
    ):
        self.config = config
        self.enabled = config.exit_enabled
        self.target_compute = target_compute
        self.warmup_steps = warmup_steps
        self.min_confidence = min_confidence
        self.interval = interval
        self.level = LEVELS
        self.updates = 0
        self.last_compute_fraction: float | None = None
        self.floor_allows: float | None = None  # the floor's allowance at the last decision
        self.window = _Window()

    def planned(self, level: int) -> float:
        return CapacitySchedule.at_level(self.config, level).planned_compute(self.config.num_hidden_layers)

    def capacity(self, step: int) -> int | None:
        """The level for optimizer step `step` (0-based), or None when no token may exit."""
        if not self.enabled or step < self.warmup_steps:
            return None
        return self.level

    def threshold(self, step: int) -> None:
        """No threshold: capacity routing decides by capacity."""
        return None

    @property
    def at_floor(self) -> bool:
        """Whether the floor holds the level above what the target asks: too few tokens are confident
        enough (min_confidence) for the target compute."""
        target = 1.0 if self.target_compute is None else self.target_compute
        return self.floor_allows is not None and self.floor_allows > target

    def update(
        self,
        compute_fraction: float,
        step: int | None = None,
        floor_counts: tuple[list[float], list[float]] | None = None,
    ) -> None:
        """Feed back one step (data-parallel totals): its compute fraction and, per layer, the floor's
        counts (`ExitState.floor_counts`). Steps without exits (warmup, exits off) change nothing."""
        self.last_compute_fraction = compute_fraction
        exiting = self.enabled if step is None else self.capacity(step) is not None
        if not exiting:
            return
        self.updates += 1
        self.window.add(compute_fraction, floor_counts)
        if self.window.steps < self.interval:
            return
        window, self.window = self.window, _Window()
        measured = window.compute / window.steps
        allows = floor_compute(window.reaching, window.confident, self.config) if window.reaching else 0.0
        self.floor_allows = allows
        goal = max(1.0 if self.target_compute is None else self.target_compute, allows)
        offset = measured - self.planned(self.level)
        expected = {level: self.planned(level) + offset for level in range(1, LEVELS + 1)}
        allowed = [level for level in expected if expected[level] >= allows - 1e-9] or [LEVELS]
        # Nearest the goal; among equal schedules (equal plans) the highest level, always the same one.
        self.level = min(allowed, key=lambda level: (round(abs(expected[level] - goal), 9), -level))

    def state_dict(self) -> dict:
        return {
            "level": self.level,
            "updates": self.updates,
            "last_compute_fraction": self.last_compute_fraction,
            "floor_allows": self.floor_allows,
            "min_confidence": self.min_confidence,
            "window": {
                "steps": self.window.steps,
                "compute": self.window.compute,
                "reaching": self.window.reaching,
                "confident": self.window.confident,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """A capacity controller's state; a threshold run's checkpoint (no level) starts at full depth."""
        self.level = int(state.get("level", LEVELS))
        self.updates = int(state.get("updates", 0))
        self.last_compute_fraction = state.get("last_compute_fraction")
        self.floor_allows = state.get("floor_allows")
        self.window = _Window(**state["window"]) if "window" in state else _Window()


def exit_controller_for(
    config: ElectraExitConfig,
    target_compute: float | None = None,
    controller_gain: float = 4.0,
    warmup_steps: int = 0,
    min_confidence: float = 0.0,
    capacity_interval: int = 50,
) -> "ExitController | CapacityController":
    """The controller the model's `exit_routing` needs, from the training settings
    (`dsexit.train.config.ExitControlConfig`: `controller_gain` steers tau, `capacity_interval` spaces
    the capacity level's changes)."""
    if config.exit_routing == "threshold":
        return ExitController(config, target_compute, controller_gain, warmup_steps, min_confidence)
    return CapacityController(config, target_compute, warmup_steps, min_confidence, capacity_interval)
