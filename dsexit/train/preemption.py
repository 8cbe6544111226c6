"""Preemption: SIGTERM / SIGINT ask the run to checkpoint and stop at the next step boundary.

The handler only sets a flag (a signal can arrive inside a collective, and logging from
a handler can deadlock); the trainer combines every rank's flag in its per-step
all-reduce, so all ranks stop at the same step, save one checkpoint and exit cleanly.
Repeated signals are expected - a scheduler signals every process of the job and the
launcher (deepspeed, torchrun) forwards its own copy - so they do not cut the save
short. Only a third SIGINT (Ctrl-C pressed three times) stops without a checkpoint.
"""

from __future__ import annotations

import signal

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER_SIGINTS = 3


class PreemptionHandler:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.sigints = 0
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "PreemptionHandler":
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints >= FORCE_AFTER_SIGINTS:
                self.uninstall()
                raise KeyboardInterrupt
