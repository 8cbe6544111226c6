"""The global sample order of an epoch, fixed by (seed, epoch) and blind to the world size.

This module owns which sample sits at each position of an epoch. Shards are
permuted, grouped into windows of `shuffle_window` consecutive shards, and the
samples inside each window are permuted. With a window of all shards this is a
full shuffle; a smaller window keeps a reader's working set to a few shards, so
a bounded cache streams without thrashing. Nothing here knows about ranks: the
reader slices positions, so every world size sees the same sequence.
"""

from __future__ import annotations

import bisect

import numpy as np

from dsexit.data.index import DatasetIndex


class EpochOrder:
    def __init__(self, index: DatasetIndex, seed: int, epoch: int, shuffle_window: int):
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be at least 1 shard, got {shuffle_window}.")
        self.seed, self.epoch = seed, epoch
        shard_starts = index.shard_starts()
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(index.shards))
        # Each window: the global sample numbers of its shards, in shard order.
        self.window_shards: list[list[int]] = []
        self._window_samples: list[np.ndarray] = []
        for first in range(0, len(shard_order), shuffle_window):
            shards = [int(s) for s in shard_order[first : first + shuffle_window]]
            self.window_shards.append(shards)
            self._window_samples.append(
                np.concatenate(
                    [np.arange(shard_starts[s], shard_starts[s] + index.shards[s].num_samples) for s in shards]
                )
            )
        self._window_starts = np.cumsum([0] + [len(samples) for samples in self._window_samples]).tolist()
        self._permuted: dict[int, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        return self._window_starts[-1]

    def window_of(self, position: int) -> int:
        return bisect.bisect_right(self._window_starts, position) - 1

    def _window(self, window: int) -> np.ndarray:
        if window not in self._permuted:
            if len(self._permuted) >= 2:  # positions only move forward: keep the current and next window
                self._permuted.pop(min(self._permuted))
            rng = np.random.default_rng([self.seed, self.epoch, 1 + window])
            self._permuted[window] = self._window_samples[window][rng.permutation(len(self._window_samples[window]))]
        return self._permuted[window]

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Global sample numbers at epoch positions [start, stop)."""
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"positions [{start}, {stop}) outside an epoch of {self.num_samples} samples.")
        pieces = []
        while start < stop:
            window = self.window_of(start)
            window_start, window_stop = self._window_starts[window], self._window_starts[window + 1]
            end = min(stop, window_stop)
            pieces.append(self._window(window)[start - window_start : end - window_start])
            start = end
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
