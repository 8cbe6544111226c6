"""Raw text inputs for data preparation: which files an input names and the documents in them.

This module owns input resolution (local paths, globs, directories, any fsspec
URL, compressed or not, and offline `datasets` datasets via `hf:`), the two text
formats (JSON Lines with a text field; plain text with blank lines between
documents), and the sentence splitting shared by tokenizer training and packing.

`hf:` inputs: `hf:DIR` is a dataset saved with `Dataset.save_to_disk` (read with
`datasets.load_from_disk`); `hf:NAME` or `hf:NAME@SPLIT` is a dataset already in
the local `datasets` cache, loaded with HF_DATASETS_OFFLINE=1 (no network).
A DatasetDict uses its "train" split unless `@SPLIT` names another.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

import fsspec

from dsexit.data.storage import open_url_fs

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GLOB_CHARS = set("*?[")
# A sentence ends at . ! or ? followed by space and something that starts a sentence.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(document: str) -> list[str]:
    """Lines of a document, long lines cut at sentence ends; empty pieces dropped."""
    sentences = []
    for line in document.split("\n"):
        sentences += [piece for piece in _SENTENCE_BREAK.split(line.strip()) if piece]
    return sentences


@dataclass(frozen=True)
class TextSource:
    """One input file (or dataset) and how to read documents from it."""

    url: str
    kind: str  # "jsonl" | "text" | "hf"
    text_field: str = "text"
    storage_options: dict | None = None

    def documents(self) -> Iterator[str]:
        if self.kind == "hf":
            yield from _hf_documents(self.url, self.text_field)
            return
        with fsspec.open(self.url, "rb", compression="infer", **(self.storage_options or {})) as raw:
            lines = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            yield from (_jsonl_documents(lines, self.url, self.text_field) if self.kind == "jsonl" else _text_documents(lines))


def _jsonl_documents(lines, url: str, text_field: str) -> Iterator[str]:
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{url} line {line_number} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{url} line {line_number} has no string field {text_field!r}.")
        yield record[text_field]


def _text_documents(lines) -> Iterator[str]:
    """Plain text: blank lines separate documents (the BERT/ELECTRA convention)."""
    document: list[str] = []
    for line in lines:
        if line.strip():
            document.append(line.rstrip("\n"))
        elif document:
            yield "\n".join(document)
            document = []
    if document:
        yield "\n".join(document)


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, split = spec.partition("@")
    if os.path.isdir(name):
        dataset = datasets.load_from_disk(name)
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            dataset = datasets.load_dataset(name, split=split or None)
        except Exception as error:  # datasets raises many types; all mean "not available offline"
            raise ValueError(f"Dataset hf:{spec} is neither a saved dataset directory nor in the local datasets cache ({error}).") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = split or "train"
        if split not in dataset:
            raise ValueError(f"Dataset hf:{spec} has no split {split!r}; it has {sorted(dataset)}.")
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise ValueError(f"Dataset hf:{spec} has no column {text_field!r}; it has {dataset.column_names}.")
    for batch in dataset.iter(batch_size=1000):
        yield from batch[text_field]


def _format_of(url: str) -> str:
    name = url.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return "jsonl" if name.endswith(_JSON_LINES_SUFFIXES) else "text"


def resolve_inputs(inputs: list[str], text_field: str = "text", storage_options: dict | None = None) -> list[TextSource]:
    """Expand paths, globs and directories into sources; raises naming the input that matches nothing."""
    sources: list[TextSource] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            sources.append(TextSource(spec[3:], "hf", text_field))
            continue
        fs, path = open_url_fs(spec, storage_options)
        if _GLOB_CHARS & set(path):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(fs.find(path))
        elif fs.exists(path):
            paths = [path]
        else:
            paths = []
        paths = [p for p in paths if not fs.isdir(p)]
        if not paths:
            raise FileNotFoundError(f"Input {spec!r} matches no file.")
        sources += [TextSource(fs.unstrip_protocol(p), _format_of(p), text_field, storage_options) for p in paths]
    return sources
