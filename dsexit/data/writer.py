"""Writing a prepared dataset: shards, the tokenizer file and index.json, to any fsspec URL.

This module owns the write side of the format that `index.py` describes: rows
are buffered into shards of about `shard_bytes` (training rows and held-out
validation rows separately, into `shard-*.bin` and `validation-*.bin`), each
shard is hashed while it is written, and index.json is written last, so a dataset whose index exists is
complete. It also owns the overwrite rule (an existing dataset is replaced only
when asked).
"""

from __future__ import annotations

import hashlib

import numpy as np

from dsexit.data.index import INDEX_FILE, DatasetIndex, ShardInfo, dtype_for_vocab, shard_name, validation_shard_name
from dsexit.data.storage import join_url, open_url_fs
from dsexit.data.tokenizer import TextTokenizer, copy_tokenizer_file


def claim_output(out_url: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse to touch an existing dataset unless overwrite; with overwrite, clear it."""
    fs, path = open_url_fs(out_url, storage_options)
    exists = fs.exists(join_url(path, INDEX_FILE)) or (fs.isdir(path) and bool(fs.ls(path)))
    if exists and not overwrite:
        raise FileExistsError(f"A dataset already exists at {out_url}; pass --overwrite to replace it.")
    if exists:
        fs.rm(path, recursive=True)
    fs.invalidate_cache()
    fs.makedirs(path, exist_ok=True)  # local filesystems need the folder; object stores ignore it


class ShardWriter:
    def __init__(self, out_url: str, tokenizer: TextTokenizer, seq_len: int, shard_bytes: int, storage_options: dict | None = None):
        self.out_url = out_url.rstrip("/")
        self.storage_options = storage_options
        self.tokenizer = tokenizer
        self.index = DatasetIndex(
            seq_len=seq_len,
            dtype=dtype_for_vocab(tokenizer.vocab_size),
            vocab_size=tokenizer.vocab_size,
            special_tokens=dict(tokenizer.special_tokens),
            tokenizer={"kind": tokenizer.kind, "file": tokenizer.file_name},
            url=self.out_url,
        )
        self.rows_per_shard = max(1, shard_bytes // self.index.row_bytes)
        # Each split: the shard list it fills in the index, how its shards are named, its unwritten rows.
        self._splits = {
            "train": (self.index.shards, shard_name, []),
            "validation": (self.index.validation_shards, validation_shard_name, []),
        }

    def add_rows(self, rows: list[list[int]]) -> None:
        self._add("train", rows)

    def add_validation_rows(self, rows: list[list[int]]) -> None:
        self._add("validation", rows)

    def _add(self, split: str, rows: list[list[int]]) -> None:
        pending = self._splits[split][2]
        pending += rows
        while len(pending) >= self.rows_per_shard:
            self._write_shard(split, pending[: self.rows_per_shard])
            del pending[: self.rows_per_shard]

    def _write_shard(self, split: str, rows: list[list[int]]) -> None:
        shards, name_of, _ = self._splits[split]
        array = np.asarray(rows, dtype=np.dtype(self.index.dtype).newbyteorder("<"))
        data = array.tobytes()
        name = name_of(len(shards))
        fs, path = open_url_fs(join_url(self.out_url, name), self.storage_options)
        with fs.open(path, "wb") as handle:
            handle.write(data)
        num_tokens = int((array != self.index.special_tokens["pad"]).sum())
        shards.append(ShardInfo(name, len(rows), len(data), hashlib.sha256(data).hexdigest(), num_tokens))

    def finish(self) -> DatasetIndex:
        """Flush the last (smaller) shards, copy the tokenizer, then write index.json."""
        for split, (_, _, pending) in self._splits.items():
            if pending:
                self._write_shard(split, pending)
                pending.clear()
        if not self.index.shards:
            raise ValueError("The inputs produced no training samples; nothing to write.")
        copy_tokenizer_file(self.tokenizer, self.out_url, self.storage_options)
        fs, path = open_url_fs(join_url(self.out_url, INDEX_FILE), self.storage_options)
        with fs.open(path, "w") as handle:
            handle.write(self.index.to_json())
        return self.index
