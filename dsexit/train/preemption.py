"""Preemption: SIGTERM / SIGINT ask the run to checkpoint and stop at the next step boundary.

The handler only sets a flag (a signal can arrive inside a collective); the trainer
combines every rank's flag in its per-step all-reduce, so all ranks stop at the same
step, save one checkpoint and exit cleanly. A second signal restores the default
behaviour, so a user pressing Ctrl-C twice is not kept waiting.
"""

from __future__ import annotations

import signal

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    def __init__(self) -> None:
        self.signal_name: str | None = None
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
        if self.requested:  # second signal: stop waiting for the step boundary
            self.uninstall()
            signal.raise_signal(signum)
            return
        # Only a flag: logging here could deadlock if the signal interrupted a log call.
        self.signal_name = signal.Signals(signum).name
