"""The streaming reader: micro-batches for one data-parallel rank, resumable, prefetched.

This module owns the schedule (global step s takes epoch positions
[s*G, (s+1)*G); data-parallel rank r takes the contiguous slice
[s*G + r*G/dp, s*G + (r+1)*G/dp), cut into micro-batches; the incomplete last
global batch of an epoch is dropped), the reader's state (epoch, global samples
consumed by the trainer), the background prefetch thread, and turning rows into
tensors. Sample order comes from `order.py`, bytes from `shards.py`.

It also owns the one read of the held-out split, `read_validation_samples`: the
validation rows in file order, through the same cache, retries and sha256 checks.
The streaming reader only ever sees `index.shards`, the training shards.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dsexit.data.index import DatasetFormatError, DatasetIndex, ShardInfo
from dsexit.data.order import EpochOrder
from dsexit.data.packing import token_type_ids
from dsexit.data.shards import DEFAULT_CACHE_MAX_BYTES, ShardCache
from dsexit.storage import RetryPolicy

log = logging.getLogger(__name__)

STATE_VERSION = 1
_OPEN_SHARDS = 64  # memory maps kept open; reopening is cheap, this only bounds file handles


def open_shard(cache: ShardCache, index: DatasetIndex, shard: ShardInfo) -> np.ndarray:
    """The shard's rows, [num_samples, seq_len], memory-mapped from its verified copy in the cache."""
    attempts_left = 3
    while True:
        path = cache.get(index.shard_url(shard), shard.sha256, shard.num_bytes)
        try:
            return np.memmap(path, dtype=np.dtype(index.dtype).newbyteorder("<"), mode="r").reshape(-1, index.seq_len)
        except FileNotFoundError:  # another rank sharing the cache evicted it between get and open
            attempts_left -= 1
            if not attempts_left:
                raise


def read_validation_samples(
    index: DatasetIndex | str,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    *,
    storage_options: dict | None = None,
    retries: int = 6,
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
) -> np.ndarray:
    """The first `max_samples` (default all) held-out rows in file order: int64 [N, seq_len].

    `index` is a loaded DatasetIndex or a dataset URL. Raises DatasetFormatError
    if the dataset has no validation split, ShardCorruptError if a shard's bytes
    do not match index.json.
    """
    if isinstance(index, str):
        index = DatasetIndex.load(index, storage_options, retries=retries)
    if not index.validation_shards:
        raise DatasetFormatError(
            f"The dataset at {index.url or '(unsaved)'} has no validation split; prepare it again with "
            f"launch/prepare_data.py --validation-fraction F (e.g. 0.02) to hold out documents for validation."
        )
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 or None, got {max_samples}.")
    wanted = index.num_validation_samples if max_samples is None else min(max_samples, index.num_validation_samples)
    cache = ShardCache(cache_dir, cache_max_bytes, RetryPolicy(retries), storage_options)
    rows = np.empty((wanted, index.seq_len), dtype=np.int64)
    filled = 0
    for shard in index.validation_shards:
        if filled == wanted:
            break
        take = min(shard.num_samples, wanted - filled)
        rows[filled : filled + take] = open_shard(cache, index, shard)[:take]
        filled += take
    return rows


class StreamingShardReader:
    """Iterate forever over micro-batches `{"input_ids", "token_type_ids", "attention_mask"}`
    (LongTensor [micro, T])."""

    def __init__(
        self,
        url: str,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_window: int = 16,
        prefetch: int = 8,
        cache_dir: str | None = None,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        storage_options: dict | None = None,
        retries: int = 6,
        retry_base_delay_s: float = 0.5,
        index: DatasetIndex | None = None,
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size}).")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a multiple of "
                f"micro_batch_size={micro_batch_size} x dp_size={dp_size}."
            )
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 micro-batches, got {prefetch}.")
        self.policy = RetryPolicy(retries, retry_base_delay_s)
        self.index = index or DatasetIndex.load(url, storage_options, retries=retries)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle_window = dp_rank, dp_size, seed, shuffle_window
        self.rank_batch_size = global_batch_size // dp_size
        self.micro_batches_per_step = self.rank_batch_size // micro_batch_size
        self.steps_per_epoch = self.index.num_samples // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"Dataset {self.index.url} has {self.index.num_samples} samples, "
                f"fewer than one global batch of {global_batch_size}."
            )
        largest = max(shard.num_bytes for shard in self.index.shards)
        if cache_max_bytes < largest:
            raise ValueError(f"cache_max_bytes={cache_max_bytes} is smaller than the largest shard ({largest} bytes).")
        self.cache = ShardCache(cache_dir, cache_max_bytes, self.policy, storage_options)
        self.prefetch = prefetch
        self._shard_starts = self.index.shard_starts()
        self._pad_id, self._sep_id = self.index.special_tokens["pad"], self.index.special_tokens["sep"]
        self._epoch, self._consumed = 0, 0  # what the trainer has taken
        self._orders: dict[int, EpochOrder] = {}
        self._open_shards: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lookahead = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsexit-shard-fetch")
        self._looked_ahead: set[tuple[int, int]] = set()
        self._worker: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- state -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "samples_consumed": self._consumed,  # global samples of this epoch the trainer has taken
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "dataset_fingerprint": self.index.fingerprint,
            "num_samples": self.index.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; dp_size and micro_batch_size may differ when the saved step was complete."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Cannot resume data reader: state version {state.get('version')!r}, expected {STATE_VERSION}."
            )
        must_match = {
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle_window": self.shuffle_window,
            "dataset_fingerprint": self.index.fingerprint,
        }
        for key, mine in must_match.items():
            if state.get(key) != mine:
                raise ValueError(
                    f"Cannot resume data reader: saved {key}={state.get(key)!r} but this run has {mine!r}."
                )
        consumed, epoch_samples = int(state["samples_consumed"]), self.steps_per_epoch * self.global_batch_size
        if not 0 <= consumed < epoch_samples:
            raise ValueError(
                f"Cannot resume data reader: samples_consumed={consumed} lies outside an epoch of {epoch_samples}."
            )
        saved_layout = (state.get("dp_size"), state.get("micro_batch_size"))
        if consumed % self.global_batch_size and saved_layout != (self.dp_size, self.micro_batch_size):
            raise ValueError(
                f"Cannot resume data reader mid-step (samples_consumed={consumed}, "
                f"global_batch_size={self.global_batch_size}) "
                f"with dp_size={self.dp_size}, micro_batch_size={self.micro_batch_size}; it was saved with "
                f"dp_size={saved_layout[0]}, micro_batch_size={saved_layout[1]}."
            )
        self._stop_worker()
        self._epoch, self._consumed = int(state["epoch"]), consumed

    # ---- iteration ---------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:
            batch = self._make_micro_batch(self._epoch, self._consumed)
        else:
            if self._worker is None:
                self._start_worker()
            position, batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._worker = None
                raise batch
            assert position == (self._epoch, self._consumed), (position, self._epoch, self._consumed)
        self._epoch, self._consumed = self._advance(self._epoch, self._consumed)
        return batch

    def _advance(self, epoch: int, consumed: int) -> tuple[int, int]:
        consumed += self.micro_batch_size * self.dp_size
        if consumed >= self.steps_per_epoch * self.global_batch_size:  # drop the incomplete last global batch
            return epoch + 1, 0
        return epoch, consumed

    def _positions(self, consumed: int) -> tuple[int, int]:
        """Epoch positions of this rank's micro-batch at a global consumed count."""
        step, in_step = divmod(consumed, self.global_batch_size)
        micro_index = in_step // (self.micro_batch_size * self.dp_size)
        start = (
            step * self.global_batch_size + self.dp_rank * self.rank_batch_size + micro_index * self.micro_batch_size
        )
        return start, start + self.micro_batch_size

    def _order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = EpochOrder(self.index, self.seed, epoch, self.shuffle_window)
        return self._orders[epoch]

    def sample_ids(self, epoch: int, consumed: int) -> np.ndarray:
        """Global sample numbers of this rank's micro-batch at (epoch, consumed); for tests and tools.

        Builds its own EpochOrder: the prefetch thread owns the cached ones.
        """
        return EpochOrder(self.index, self.seed, epoch, self.shuffle_window).samples(*self._positions(consumed))

    def _make_micro_batch(self, epoch: int, consumed: int) -> dict[str, torch.Tensor]:
        start, stop = self._positions(consumed)
        order = self._order(epoch)
        self._look_ahead(epoch, order, order.window_of(start) + 1)
        input_ids = torch.from_numpy(self._read_rows(order.samples(start, stop)))
        attention_mask = (input_ids != self._pad_id).long()
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids(input_ids, self._sep_id, self._pad_id),
            "attention_mask": attention_mask,
        }

    def _read_rows(self, samples: np.ndarray) -> np.ndarray:
        rows = np.empty((len(samples), self.index.seq_len), dtype=np.int64)
        for i, sample in enumerate(samples.tolist()):
            shard_number, row = self.index.locate(sample, self._shard_starts)
            rows[i] = self._shard_array(shard_number)[row]
        return rows

    def _shard_array(self, shard_number: int) -> np.ndarray:
        if shard_number in self._open_shards:
            self._open_shards.move_to_end(shard_number)
            return self._open_shards[shard_number]
        array = open_shard(self.cache, self.index, self.index.shards[shard_number])
        self._open_shards[shard_number] = array
        if len(self._open_shards) > _OPEN_SHARDS:
            self._open_shards.popitem(last=False)
        return array

    def _look_ahead(self, epoch: int, order: EpochOrder, window: int) -> None:
        """Start downloading the next window's shards while this one is consumed."""
        if window >= len(order.window_shards) or (epoch, window) in self._looked_ahead:
            return
        self._looked_ahead.add((epoch, window))
        for shard_number in order.window_shards[window]:
            shard = self.index.shards[shard_number]
            future = self._lookahead.submit(self.cache.get, self.index.shard_url(shard), shard.sha256, shard.num_bytes)
            future.add_done_callback(lambda f: f.exception())  # failures are retried when the shard is needed

    # ---- prefetch thread -----------------------------------------------------
    def _start_worker(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._worker = threading.Thread(
            target=self._produce,
            args=(self._epoch, self._consumed, self._queue, self._stop),
            daemon=True,
            name="dsexit-prefetch",
        )
        self._worker.start()

    def _produce(self, epoch: int, consumed: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self._make_micro_batch(epoch, consumed)
            except BaseException as error:  # handed to the trainer's next(), which raises it
                item = error
            while not stop.is_set():
                try:
                    out.put(((epoch, consumed), item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            epoch, consumed = self._advance(epoch, consumed)

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
            self._queue = None

    def close(self) -> None:
        self._stop_worker()
        self._lookahead.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
