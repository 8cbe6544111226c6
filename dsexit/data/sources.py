"""Raw text inputs for data preparation: which files an input names and the documents in them.

This module owns input resolution (local paths, globs, directories, any fsspec
URL, compressed or not, and offline `datasets` datasets via `hf:`), the two text
formats (JSON Lines with a text field; plain text with blank lines between
documents), decoding (`--encoding`, refusing binary or undecodable input), and
the sentence splitting shared by tokenizer training and packing.

Reading is bounded: files are read and decoded `CHUNK_BYTES` at a time, and a
document (or a plain-text line) longer than `MAX_PIECE_CHARS` comes out in
pieces of at most that many characters, cut at whitespace, so memory does not
grow with the length of a line. A JSON Lines record is parsed whole (its line
is held once), then cut the same way.

Not text: a NUL character, or more than `MAX_CONTROL_SHARE` of a chunk in other
control characters, is an error naming the file and byte offset. Bytes that do
not decode with the chosen encoding are an error too, or, with
`undecodable="skip"`, the line holding them (of a long line, the piece) is
skipped and counted in a `SkipReport`.

`hf:` inputs: `hf:DIR` is a dataset saved with `Dataset.save_to_disk` (read with
`datasets.load_from_disk`); `hf:NAME` or `hf:NAME@SPLIT` is a dataset already in
the local `datasets` cache, loaded with HF_DATASETS_OFFLINE=1 (no network).
A DatasetDict uses its "train" split unless `@SPLIT` names another.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

from fsspec.compression import compr
from fsspec.utils import infer_compression

from dsexit.storage import ACCESS_ERRORS, access_error, open_url_fs

CHUNK_BYTES = 256 << 10  # read and decoded at a time
MAX_PIECE_CHARS = 256 << 10  # the longest document piece (and plain-text line piece) held at once
PROBE_BYTES = 64 << 10  # what is read of each input before any work, to refuse binary or misdecoded files early
MAX_CONTROL_SHARE = 0.05  # more than this share of control characters in a chunk: not text
UNDECODABLE_CHOICES = ("error", "skip")

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GLOB_CHARS = set("*?[")
# A sentence ends at . ! or ? followed by space and something that starts a sentence.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
# Control characters other than \t \n \v \f \r: text has few, binary data many.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
# Undecodable bytes become this lone surrogate, which no strict decoder produces, so they can be found after decoding.
_UNDECODABLE_MARK = "\udcff"
_MARK_HANDLER = "dsexit-mark-undecodable"
codecs.register_error(_MARK_HANDLER, lambda error: (_UNDECODABLE_MARK, error.end))
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # I/O and broken compressed streams


class NotTextError(ValueError):
    """An input holds binary data or bytes that do not decode with the chosen encoding."""


def split_sentences(document: str) -> list[str]:
    """Lines of a document, long lines cut at sentence ends; empty pieces dropped."""
    sentences = []
    for line in document.split("\n"):
        sentences += [piece for piece in _SENTENCE_BREAK.split(line.strip()) if piece]
    return sentences


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; raises naming the value if Python has no such text encoding."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"Unknown --encoding {encoding!r}; expected a text encoding such as utf-8, latin-1 or cp1252.")
    return info.name


class SkipReport:
    """Lines (of lines longer than a piece, pieces) skipped for undecodable bytes."""

    def __init__(self):
        self.lines = 0
        self.first = ""  # "URL line N" of the first one

    def add(self, url: str, line_number: int) -> None:
        if not self.lines:
            self.first = f"{url} line {line_number}"
        self.lines += 1


@dataclass(frozen=True)
class TextSource:
    """One input file (or dataset) and how to read documents from it."""

    url: str
    kind: str  # "jsonl" | "text" | "hf"
    text_field: str = "text"
    storage_options: dict | None = None
    encoding: str = "utf-8"
    undecodable: str = "error"  # "error" | "skip"

    def documents(self, skipped: SkipReport | None = None) -> Iterator[tuple[str, bool]]:
        """(text, continues): documents, each in pieces of at most MAX_PIECE_CHARS; continues marks a later piece."""
        if self.kind == "hf":
            for document in _hf_documents(self.url, self.text_field):
                yield from _pieces(document)
            return
        with _open_binary(self.url, self.storage_options) as raw:
            chunks = _decoded_chunks(raw, self.url, self.encoding, self.undecodable, CHUNK_BYTES)
            if self.kind == "jsonl":
                lines = _lines(chunks, self.url, None, skipped)
                yield from _jsonl_documents(lines, self.url, self.text_field)
            else:
                yield from _text_documents(_lines(chunks, self.url, MAX_PIECE_CHARS, skipped))

    def check(self) -> None:
        """Read the start of the input and raise if it cannot be read or is not text in its encoding."""
        if self.kind == "hf":
            return
        with _open_binary(self.url, self.storage_options) as raw:
            next(_decoded_chunks(raw, self.url, self.encoding, self.undecodable, PROBE_BYTES))


@contextlib.contextmanager
def _open_binary(url: str, storage_options: dict | None):
    """The input's bytes, decompressed by suffix; read errors become one line naming the input."""
    try:
        fs, path = open_url_fs(url, storage_options)
        with fs.open(path, "rb", block_size=CHUNK_BYTES) as raw:
            compression = infer_compression(path)
            stream = compr[compression](raw, mode="rb") if compression else raw
            try:
                yield stream
            finally:
                if stream is not raw:
                    stream.close()
    except ACCESS_ERRORS as error:
        raise access_error(url, error) from None
    except _READ_ERRORS as error:
        raise ValueError(f"Cannot read input {url}: {error}".replace("\n", " ")) from None


def _decoded_chunks(raw, url: str, encoding: str, undecodable: str, chunk_bytes: int) -> Iterator[str]:
    """Decoded text, chunk by chunk, each checked by `_check_text` before it is yielded."""
    decoder = codecs.getincrementaldecoder(encoding)(errors=_MARK_HANDLER)
    consumed = lines_before = 0
    while True:
        data = raw.read(chunk_bytes)
        buffered = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
        text = decoder.decode(data, final=not data)
        _check_text(text, url, encoding, undecodable, consumed - buffered, lines_before)
        consumed += len(data)
        yield text
        if not data:
            return
        lines_before += text.count("\n")


def _check_text(text: str, url: str, encoding: str, undecodable: str, start_byte: int, lines_before: int) -> None:
    def where(position: int) -> str:
        try:
            offset = start_byte + len(text[:position].encode(encoding, "surrogateescape"))
        except UnicodeError:  # an encoder without surrogateescape: the marks count one byte each
            offset = start_byte + len(text[:position].encode(encoding, "replace"))
        return f"byte offset {offset} (line {lines_before + text.count(chr(10), 0, position) + 1})"

    nul = text.find("\x00")
    if nul >= 0:
        raise NotTextError(
            f"{url} is not text: a NUL character at {where(nul)}; binary files cannot be prepared "
            "(UTF-16 text needs --encoding utf-16)."
        )
    controls = len(text) - len(_CONTROL_CHARS.sub("", text))
    if controls > max(3, MAX_CONTROL_SHARE * len(text)):
        first = _CONTROL_CHARS.search(text).start()
        raise NotTextError(
            f"{url} is not text: {controls} of {len(text)} characters from {where(first)} on are "
            "control characters; binary files cannot be prepared."
        )
    bad = text.find(_UNDECODABLE_MARK) if undecodable == "error" else -1
    if bad >= 0:
        raise NotTextError(
            f"{url} is not valid {encoding}: undecodable bytes at {where(bad)}; "
            "pass its --encoding (e.g. latin-1) or --undecodable skip."
        )


def _cut(text: str, start: int, max_chars: int) -> int:
    """Where to end a piece of text[start:]: after the last whitespace in reach, else at max_chars."""
    end = start + max_chars
    space = max(text.rfind(" ", start, end), text.rfind("\n", start, end), text.rfind("\t", start, end))
    return space + 1 if space > start + max_chars // 2 else end


def _pieces(text: str, max_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """(piece, not first): text cut after whitespace into pieces of at most max_chars (default MAX_PIECE_CHARS)."""
    max_chars = max_chars or MAX_PIECE_CHARS
    start = 0
    while len(text) - start > max_chars:
        end = _cut(text, start, max_chars)
        yield text[start:end], start > 0
        start = end
    yield text[start:], start > 0


def _lines(
    chunks: Iterator[str], url: str, max_chars: int | None, skipped: SkipReport | None
) -> Iterator[tuple[str, bool, int]]:
    """(piece, ends_line, line number): each line without its newline; with max_chars, longer lines in pieces.

    Pieces holding undecodable bytes (only present with undecodable="skip") are dropped and counted.
    """
    pending: list[str] = []  # the current line so far
    pending_chars = 0
    line_number = 1
    line_started = False  # a piece of the current line was already yielded

    def keep(piece: str, ends_line: bool):
        nonlocal line_started
        if _UNDECODABLE_MARK in piece:
            if skipped is not None:
                skipped.add(url, line_number)
            if ends_line and line_started:
                line_started = False
                return [("", True, line_number)]  # close the line its earlier pieces opened
            return []
        line_started = not ends_line
        return [(piece, ends_line, line_number)]

    for text in chunks:
        lines = text.split("\n")
        pending.append(lines[0])
        pending_chars += len(lines[0])
        if len(lines) > 1:
            for line in ["".join(pending), *lines[1:-1]]:
                line = line.removesuffix("\r")
                pieces = [line] if max_chars is None else [piece for piece, _ in _pieces(line, max_chars)]
                for number, piece in enumerate(pieces, 1):
                    yield from keep(piece, number == len(pieces))
                line_number += 1
            pending, pending_chars = [lines[-1]], len(lines[-1])
        if max_chars is not None and pending_chars > max_chars:
            line = "".join(pending)
            end = _cut(line, 0, max_chars)
            yield from keep(line[:end], False)
            pending, pending_chars = [line[end:]], len(line) - end
    if pending_chars:
        yield from keep("".join(pending).removesuffix("\r"), True)


def _text_documents(lines: Iterator[tuple[str, bool, int]]) -> Iterator[tuple[str, bool]]:
    """Plain text: blank lines separate documents (the BERT/ELECTRA convention)."""
    parts: list[str] = []
    chars = 0
    continues = line_open = False
    for piece, ends_line, _ in lines:
        if ends_line and not line_open and not piece.strip():  # a blank line
            if parts:
                yield "".join(parts), continues
                parts, chars, continues = [], 0, False
            continue
        if parts and chars + len(piece) + 1 > MAX_PIECE_CHARS:
            yield "".join(parts), continues
            parts, chars, continues = [], 0, True
        parts.append(piece + "\n" if ends_line else piece)
        chars += len(piece) + 1
        line_open = not ends_line
    if parts:
        yield "".join(parts), continues


def _jsonl_documents(lines: Iterator[tuple[str, bool, int]], url: str, text_field: str) -> Iterator[tuple[str, bool]]:
    for line, _, line_number in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{url} line {line_number} is not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{url} line {line_number} has no string field {text_field!r}.")
        yield from _pieces(record[text_field])


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
            raise ValueError(
                f"Dataset hf:{spec} is neither a saved dataset directory nor in the local datasets cache ({error})."
            ) from None
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


def resolve_inputs(
    inputs: list[str],
    text_field: str = "text",
    storage_options: dict | None = None,
    encoding: str = "utf-8",
    undecodable: str = "error",
) -> list[TextSource]:
    """Expand paths, globs and directories into sources; raises naming the input that matches nothing."""
    encoding = check_encoding(encoding)
    if undecodable not in UNDECODABLE_CHOICES:
        raise ValueError(f"--undecodable must be one of {UNDECODABLE_CHOICES}, got {undecodable!r}.")
    sources: list[TextSource] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            try:
                import datasets  # noqa: F401  (checked before any work; read in _hf_documents)
            except ImportError:
                raise ValueError(
                    f"Input {spec!r} needs the datasets package, which is not installed; "
                    f"install it with: pip install 'dsexit[hf]'."
                ) from None
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
        local = "file" in fs.protocol  # plain paths read better in messages than file:// URLs
        sources += [
            TextSource(
                p if local else fs.unstrip_protocol(p),
                _format_of(p),
                text_field,
                storage_options,
                encoding,
                undecodable,
            )
            for p in paths
        ]
    return sources


def cut_text(text: str, max_chars: int) -> Iterator[str]:
    """Text in pieces of at most max_chars, cut after whitespace where there is some in the second half."""
    return (piece for piece, _ in _pieces(text, max_chars))
