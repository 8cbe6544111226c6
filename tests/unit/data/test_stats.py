"""Token frequencies read from the shards agree with the index and with the rows themselves."""

import numpy as np

from dsexit.data import DEFAULT_DATA_URL, DatasetIndex, StreamingShardReader
from dsexit.data.stats import token_counts


def test_token_counts_match_index_and_streamed_rows(tmp_path):
    index = DatasetIndex.load(DEFAULT_DATA_URL)
    counts = token_counts(index, cache_dir=str(tmp_path / "cache"))
    pad = index.special_tokens["pad"]
    assert counts.sum() == index.num_samples * index.seq_len
    assert counts.sum() - counts[pad] == index.num_tokens
    # One epoch streamed through the reader (every sample once) holds the same tokens.
    global_batch = 17
    with StreamingShardReader(
        DEFAULT_DATA_URL,
        global_batch_size=global_batch,
        micro_batch_size=global_batch,
        cache_dir=str(tmp_path / "reader"),
    ) as reader:
        streamed = np.zeros_like(counts)
        for _ in range(reader.steps_per_epoch):
            streamed += np.bincount(next(reader)["input_ids"].numpy().ravel(), minlength=index.vocab_size)
    dropped = index.num_samples % global_batch  # the incomplete last global batch is dropped
    assert (streamed <= counts).all()
    assert counts.sum() - streamed.sum() == dropped * index.seq_len
