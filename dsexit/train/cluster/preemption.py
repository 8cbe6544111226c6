"""Preemption: SIGTERM / SIGINT, or the loss of the launcher, ask the run to checkpoint and stop.

The handler only sets a flag (a signal can arrive inside a collective, and logging from
a handler can deadlock); the trainer combines every rank's flag in its per-step
all-reduce, so all ranks stop at the same step, save one checkpoint and exit cleanly
(exit code 0). Repeated signals are expected - a scheduler signals every process of the
job and the launcher (deepspeed, torchrun) forwards its own copy - so they do not cut
the save short. Only a third SIGINT (Ctrl-C pressed three times) stops without a checkpoint.

The launcher watch covers the signal that never reaches the ranks: `deepspeed`'s runner
has no SIGTERM handler on a single node (or with --no_ssh), so a SIGTERM sent to it alone
kills it and leaves its per-node launcher and the ranks training without a parent. Each
rank therefore watches the launcher that started it (deepspeed's per-node launcher and
the runner above it; torchrun's agent) and treats its disappearance like a SIGTERM.
Plain `python` runs and mpirun are not watched: their parent is a shell or an MPI daemon,
whose exit says nothing about the job (`nohup python ... &` must survive a logout).
"""

from __future__ import annotations

import os
import signal
import threading

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER_SIGINTS = 3
WATCH_INTERVAL_S = 0.5
# Command-line fragments of the processes whose death means the job is over.
DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
TORCHRUN_AGENTS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def _parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc, or None when the process is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state": ppid


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_lineage(pid: int | None = None) -> list[tuple[int, int]]:
    """(process, its parent) pairs whose parent must stay the same while this rank trains: for a rank
    of deepspeed's per-node launcher, the launcher and the runner above it; for a torchrun worker,
    the agent; otherwise none."""
    pid = os.getpid() if pid is None else pid
    parent = _parent_pid(pid)
    if parent is None or parent <= 1:
        return []
    command = _command_line(parent)
    if DEEPSPEED_NODE_LAUNCHER in command:
        grandparent = _parent_pid(parent)
        lineage = [(pid, parent)]
        if grandparent is not None and grandparent > 1:
            lineage.append((parent, grandparent))  # the runner (or pdsh's remote shell) above the launcher
        return lineage
    if any(agent in command for agent in TORCHRUN_AGENTS):
        return [(pid, parent)]
    return []


class PreemptionHandler:
    def __init__(self, watch_launcher: bool = True) -> None:
        self.signal_name: str | None = None
        self.sigints = 0
        self._previous = {}
        self._watch_launcher = watch_launcher
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "PreemptionHandler":
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        lineage = launcher_lineage() if self._watch_launcher else []
        if lineage:
            self._watch_stop.clear()
            self._watcher = threading.Thread(
                target=self._watch, args=(lineage,), daemon=True, name="dsexit-launcher-watch"
            )
            self._watcher.start()
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._watch_stop.set()
        self._watcher = None

    def _watch(self, lineage: list[tuple[int, int]]) -> None:
        while not self._watch_stop.wait(WATCH_INTERVAL_S):
            for child, parent in lineage:
                if _parent_pid(child) != parent:  # the parent exited: the child was re-parented (or is gone)
                    what = "runner" if child != os.getpid() else "launcher"
                    self.signal_name = self.signal_name or f"the {what} (pid {parent}) exited"
                    return

    def _handle(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints >= FORCE_AFTER_SIGINTS:
                self.uninstall()
                raise KeyboardInterrupt
