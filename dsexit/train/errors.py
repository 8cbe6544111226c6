"""The errors a run raises, one kind per way it can end; `dsexit/commands/pretrain.py` turns
each kind into its exit code.

    TrainError              what every kind below shares
      CheckpointError       a checkpoint cannot be used (a missing or changed file, a node that lacks
                            it, a download that fails): one sentence naming the file
        CheckpointSpaceError  the disk filled while a checkpoint was written: the torn step is removed
"""

from __future__ import annotations


class TrainError(Exception):
    """A run cannot go on; one sentence says why and what to do."""


class CheckpointError(TrainError, ValueError):
    """A checkpoint cannot be used or written; one sentence naming the file and what is wrong."""


class CheckpointSpaceError(CheckpointError):
    """No space was left on the device while a checkpoint was written."""
