"""launch/pretrain.py with a power cut inside one checkpoint save: the test side of "kill -9 mid-save".

    python fault_entry.py --kill-at-save STEP <trainer arguments>     (or under any launcher)

At STEP, rank 0 SIGKILLs itself once every rank's shards are written and before the completion
marker (and `latest`) are: exactly the torn save a resume must skip. The launcher then ends the
other ranks, as it would after a real crash. Everything else is the normal trainer: the kill is
put in from outside by wrapping `CheckpointManager._complete`, the step that writes the marker.
"""

from __future__ import annotations

import os
import signal
import sys


def _take_kill_step(argv: list[str]) -> int:
    """Remove `--kill-at-save STEP` from argv (launchers may put their own flags before it)."""
    at = argv.index("--kill-at-save")
    step = int(argv[at + 1])
    del argv[at : at + 2]
    return step


def main() -> int:
    kill_step = _take_kill_step(sys.argv)

    from dsexit.train.checkpoint.manager import CheckpointManager

    complete = CheckpointManager._complete

    def complete_or_die(self, tag_dir, meta):
        if meta["step"] == kill_step and self.world.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
        return complete(self, tag_dir, meta)

    CheckpointManager._complete = complete_or_die

    from dsexit.commands.pretrain import main as pretrain

    return pretrain()


if __name__ == "__main__":
    sys.exit(main())
