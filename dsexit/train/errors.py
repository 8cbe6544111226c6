"""The errors a run raises, one kind per way it ends; `dsexit/commands/pretrain.py` turns each
kind into its exit code, and a library caller of `Trainer` catches them by kind.

    TrainError                what every kind below shares: one sentence, what is wrong and what to do
      ConfigError             a value the user chose is invalid (found before any work starts)
      CheckpointError         a checkpoint cannot be used: a missing or changed file, a node that
                              lacks it, a download that fails
        CheckpointSpaceError  the disk filled while a checkpoint was written (the torn step is removed)

A lost peer surfaces as torch's own DistBackendError, which `distributed.describe_peer_failure`
turns into a sentence naming the node.
"""

from __future__ import annotations


class TrainError(Exception):
    """A run cannot go on; one sentence says why and what to do."""


class ConfigError(TrainError, ValueError):
    """A value the user chose is invalid; raised before any work starts."""


class CheckpointError(TrainError, ValueError):
    """A checkpoint cannot be used or written; one sentence naming the file and what is wrong."""


class CheckpointSpaceError(CheckpointError):
    """No space was left on the device while a checkpoint was written."""
