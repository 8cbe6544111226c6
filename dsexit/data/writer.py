"""Writing a prepared dataset: shards, the tokenizer file and index.json, to any fsspec URL.

This module owns the write side of the format that `index.py` describes: rows
are buffered into shards of about `shard_bytes` (training rows and held-out
validation rows separately, into `shard-*.bin` and `validation-*.bin`), each
shard is hashed while it is written, and index.json is written last, so a
dataset whose index exists is complete.

It also owns what an output location may hold and what `prepare_data` may
delete there (`StagedOutput`):
- an absent or empty location, or one that holds exactly a dsexit dataset (every
  file listed by its index.json), may be written; anything else is refused, with
  or without overwrite, and nothing there is touched;
- an existing dataset is replaced only when asked, and only the files its index
  lists (shards, validation shards, tokenizer file, index.json) are replaced or
  removed;
- the new dataset is written into a staging prefix inside the location
  (`.dsexit-staging-<random>/`) and moved into place only once it is complete,
  index.json last; a failure before that removes the staging prefix and leaves
  the old dataset byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from dsexit.data.index import (
    INDEX_FILE,
    DatasetFormatError,
    DatasetIndex,
    ShardInfo,
    dtype_for_vocab,
    shard_name,
    validation_shard_name,
)
from dsexit.data.tokenizer import TextTokenizer, copy_tokenizer_file
from dsexit.storage import ACCESS_ERRORS, access_error, join_url, open_url_fs

log = logging.getLogger(__name__)

STAGING_PREFIX = ".dsexit-staging-"


class OutputRefusedError(ValueError):
    """The output location holds something prepare_data may not replace (or cannot be written)."""


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def listed_files(index: DatasetIndex) -> set[str]:
    """Every name a dataset's index.json accounts for, index.json included."""
    return {INDEX_FILE, index.tokenizer["file"], *(shard.name for shard in index.shards + index.validation_shards)}


def inspect_output(out_url: str, storage_options: dict | None = None) -> DatasetIndex | None:
    """The dsexit dataset at out_url, None if the location is absent or empty; refuses anything else.

    Staging prefixes (`.dsexit-staging-*`) left by an interrupted run are ours and not counted.
    """
    fs, root = open_url_fs(out_url, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache()
    try:
        if fs.isfile(root):
            raise OutputRefusedError(f"--out {out_url} is a file; expected a directory or a URL prefix.")
        # A dataset is flat, so the top level tells: any folder in it is not ours.
        entries = fs.ls(root, detail=False) if fs.isdir(root) else []
    except OutputRefusedError:
        raise
    except ACCESS_ERRORS as error:
        raise access_error(out_url, error) from None
    except (OSError, ValueError) as error:
        raise OutputRefusedError(f"Cannot list --out {out_url}: {error}".replace("\n", " ")) from None
    names = sorted({entry.rstrip("/")[len(root) + 1 :] for entry in entries if entry.startswith(root + "/")} - {""})
    names = [name for name in names if not name.startswith(STAGING_PREFIX)]
    if not names:
        return None
    if INDEX_FILE not in names:
        raise OutputRefusedError(
            f"--out {out_url} holds files that prepare_data did not write ({_examples(names)}) and no {INDEX_FILE}; "
            "it writes only to a new or empty location or over its own output, with or without --overwrite."
        )
    try:
        text = fs.cat_file(join_url(root, INDEX_FILE)).decode("utf-8", errors="replace")
        index = DatasetIndex.from_json(text, url=out_url.rstrip("/"))
    except DatasetFormatError as error:
        raise OutputRefusedError(
            f"--out {out_url} holds an {INDEX_FILE} that prepare_data cannot read as its own ({error}); "
            "refusing to write there, with or without --overwrite."
        ) from None
    outside = [name for name in listed_files(index) if "/" in name or "\\" in name or name in ("", ".", "..")]
    if outside:  # replacing would delete them: only plain names inside the location are ever ours
        raise OutputRefusedError(
            f"--out {out_url} holds an {INDEX_FILE} that lists files outside it ({_examples(sorted(outside))}); "
            "refusing to write there, with or without --overwrite."
        )
    unlisted = [name for name in names if name not in listed_files(index)]
    if unlisted:
        raise OutputRefusedError(
            f"--out {out_url} holds a dsexit dataset and also files its {INDEX_FILE} does not list "
            f"({_examples(unlisted)}); prepare_data never deletes what it did not write, so it refuses "
            "with or without --overwrite. Move them away or choose another --out."
        )
    return index


def claim_output(out_url: str, overwrite: bool, storage_options: dict | None = None) -> DatasetIndex | None:
    """The dataset out_url holds (None if absent or empty); raises unless it may be replaced."""
    previous = inspect_output(out_url, storage_options)
    if previous is not None and not overwrite:
        raise FileExistsError(
            f"--out {out_url} already holds a dsexit dataset; --overwrite replaces it "
            f"(only the files its {INDEX_FILE} lists)."
        )
    return previous


class StagedOutput:
    """A new dataset written beside the one at out_url and switched in at the end.

    Constructing it checks the location (`claim_output`) and writes nothing. Inside
    `with`, write to `staging_url`, then call `publish(index)`; leaving the block
    without publishing (an error, an interrupt) removes the staging prefix.
    """

    def __init__(self, out_url: str, overwrite: bool, storage_options: dict | None = None):
        self.out_url = out_url.rstrip("/")
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.previous = claim_output(self.out_url, overwrite, storage_options)
        self.fs, self._root = open_url_fs(self.out_url, storage_options)
        self._root = self._root.rstrip("/")
        self._root_existed = self.fs.exists(self._root)
        self.staging_name = f"{STAGING_PREFIX}{secrets.token_hex(6)}"
        self.staging_url = join_url(self.out_url, self.staging_name)
        self._staging_path = join_url(self._root, self.staging_name)
        self._published = False

    def __enter__(self) -> "StagedOutput":
        try:
            if isinstance(self.fs, LocalFileSystem):  # on an object store makedirs could create a bucket
                self.fs.makedirs(self._staging_path, exist_ok=True)
            probe = join_url(self._staging_path, ".probe")
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except OSError as error:
            self._discard()
            raise OutputRefusedError(f"Cannot write to --out {self.out_url}: {error}".replace("\n", " ")) from None
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._published:
            self._discard()

    def _discard(self) -> None:
        try:
            if self.fs.exists(self._staging_path):
                self.fs.rm(self._staging_path, recursive=True)
            if (
                not self._root_existed
                and isinstance(self.fs, LocalFileSystem)
                and self.fs.isdir(self._root)
                and not self.fs.ls(self._root)
            ):
                self.fs.rmdir(self._root)
        except OSError as error:  # the original error matters more than a failed cleanup
            log.warning("could not remove the staging prefix %s: %r", self.staging_url, error)

    def publish(self, index: DatasetIndex) -> DatasetIndex:
        """Move the staged files into place (index.json last), then remove old files the new index does not list."""
        # The location is checked again: something written there meanwhile is refused, not overwritten.
        current = claim_output(self.out_url, self.overwrite, self.storage_options)
        if (current and current.to_json()) != (self.previous and self.previous.to_json()):
            raise OutputRefusedError(f"--out {self.out_url} changed while this dataset was prepared; not replacing it.")
        new_names = listed_files(index)
        self._published = True  # from here on the staged copy is the only complete one: keep it on failure
        try:
            for name in sorted(new_names - {INDEX_FILE}) + [INDEX_FILE]:
                self.fs.mv(join_url(self._staging_path, name), join_url(self._root, name))
        except OSError as error:
            raise OutputRefusedError(
                f"Moving the new dataset into --out {self.out_url} failed midway ({error!r}); files moved so far sit "
                f"under the old {INDEX_FILE}, the rest of the new dataset ({INDEX_FILE} included) "
                f"is in {self.staging_url}."
            ) from None
        stale = listed_files(self.previous) - new_names if self.previous else set()
        for name in sorted(stale):
            try:
                self.fs.rm_file(join_url(self._root, name))
            except FileNotFoundError:
                pass
        self._discard()
        self.fs.invalidate_cache()
        index.url = self.out_url
        return index


class ShardWriter:
    """Writes shards, the tokenizer file and index.json (last) directly under out_url."""

    def __init__(
        self,
        out_url: str,
        tokenizer: TextTokenizer,
        seq_len: int,
        shard_bytes: int,
        storage_options: dict | None = None,
    ):
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
        self._row_dtype = np.dtype(self.index.dtype).newbyteorder("<")
        # Each split: the shard list it fills in the index and how its shards are named.
        self._splits = {
            "train": (self.index.shards, shard_name),
            "validation": (self.index.validation_shards, validation_shard_name),
        }
        # Unwritten rows as arrays, not lists of Python ints, which take ~18x the bytes of the shard they buffer.
        self._pending: dict[str, list[np.ndarray]] = {split: [] for split in self._splits}
        self._pending_rows = dict.fromkeys(self._splits, 0)

    def add_rows(self, rows: list[list[int]]) -> None:
        self._add("train", rows)

    def add_validation_rows(self, rows: list[list[int]]) -> None:
        self._add("validation", rows)

    def _add(self, split: str, rows: list[list[int]]) -> None:
        if not rows:
            return
        self._pending[split].append(np.asarray(rows, dtype=self._row_dtype))
        self._pending_rows[split] += len(rows)
        if self._pending_rows[split] >= self.rows_per_shard:
            buffered = self._take_pending(split)
            start = 0
            while len(buffered) - start >= self.rows_per_shard:
                self._write_shard(split, buffered[start : start + self.rows_per_shard])
                start += self.rows_per_shard
            if start < len(buffered):
                self._pending[split].append(buffered[start:].copy())
                self._pending_rows[split] = len(buffered) - start

    def _take_pending(self, split: str) -> np.ndarray:
        buffered = np.concatenate(self._pending[split])
        self._pending[split].clear()
        self._pending_rows[split] = 0
        return buffered

    def _write_shard(self, split: str, rows: np.ndarray) -> None:
        shards, name_of = self._splits[split]
        data = rows.tobytes()
        name = name_of(len(shards))
        fs, path = open_url_fs(join_url(self.out_url, name), self.storage_options)
        with fs.open(path, "wb") as handle:
            handle.write(data)
        num_tokens = int((rows != self.index.special_tokens["pad"]).sum())
        shards.append(ShardInfo(name, len(rows), len(data), hashlib.sha256(data).hexdigest(), num_tokens))

    def finish(self) -> DatasetIndex:
        """Flush the last (smaller) shards, copy the tokenizer, then write index.json."""
        for split in self._splits:
            if self._pending_rows[split]:
                self._write_shard(split, self._take_pending(split))
        if not self.index.shards:
            raise ValueError("The inputs produced no training samples; nothing to write.")
        copy_tokenizer_file(self.tokenizer, self.out_url, self.storage_options)
        fs, path = open_url_fs(join_url(self.out_url, INDEX_FILE), self.storage_options)
        with fs.open(path, "w") as handle:
            handle.write(self.index.to_json())
        return self.index
