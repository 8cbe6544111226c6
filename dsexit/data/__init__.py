"""Data for ELECTRA pre-training: preparation into shards and streaming them back.

URLs, retries, atomic writes and credential redaction are `dsexit.storage`'s (shared with
`dsexit.train`).

What lives where:
    index.py     index.json, the dataset format (DatasetIndex)
    shards.py    the shard check before a run, verified downloads, the LRU shard cache
    sources.py   raw text inputs (files, globs, fsspec URLs, hf: datasets), sentence splitting
    tokenizer.py tokenizer specs, SentencePiece training, Hugging Face export
    packing.py   BERT/ELECTRA sample layout ([CLS] A [SEP] B [SEP]) and token type ids
    writer.py    shards + tokenizer + index.json to any fsspec URL
    prepare.py   the preparation pipeline (launch/prepare_data.py)
    order.py     the (seed, epoch) sample order, independent of world size
    reader.py    StreamingShardReader: per-rank micro-batches, resumable, prefetched;
                 read_validation_samples: the held-out split, never streamed for training
    default/     the embedded default dataset (see DEFAULT_DATA.md)
"""

from pathlib import Path

from dsexit.data.index import DatasetFormatError, DatasetIndex, ShardInfo
from dsexit.data.reader import StreamingShardReader, read_validation_samples
from dsexit.data.shards import ShardCorruptError
from dsexit.data.tokenizer import save_hf_tokenizer

DEFAULT_DATA_URL = str(Path(__file__).resolve().parent / "default")
"""The dataset shipped inside the package: Moby-Dick and Jane Austen, WordPiece (ELECTRA's vocab), seq_len 128."""


__all__ = [
    "DEFAULT_DATA_URL",
    "DatasetFormatError",
    "DatasetIndex",
    "ShardCorruptError",
    "ShardInfo",
    "StreamingShardReader",
    "read_validation_samples",
    "save_hf_tokenizer",
]
