"""The data preparation pipeline behind `launch/prepare_data.py`.

This module owns the order of work: validate every argument before any work,
train or load the tokenizer, stream documents through sentence splitting, batch
encoding and the BERT/ELECTRA packer into the shard writer, and report progress
(a bar on a terminal, plain log lines otherwise).

It also owns the held-out split: each document goes, whole, to training or to
validation by a draw from (seed, document number) alone (`is_validation_document`),
and each side has its own packer, so no sample mixes the two and the split does
not depend on batching, input sizes or the tokenizer.

Order of work, so that a mistake costs nothing: arguments, inputs (each one's
start is read and must be text in `--encoding`), the output location
(`StagedOutput` refuses what it may not replace), the tokenizer; only then are
shards written, into a staging prefix that replaces the old dataset at the end.
A document longer than `sources.MAX_PIECE_CHARS` arrives in pieces; each piece
is packed as it comes (so one closes a sample), and all go to the same side of
the split.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from typing import Iterator

from dsexit.data.index import DatasetIndex
from dsexit.data.packing import SequencePacker
from dsexit.data.sources import MAX_PIECE_CHARS, SkipReport, TextSource, cut_text, resolve_inputs, split_sentences
from dsexit.data.tokenizer import load_tokenizer, parse_tokenizer_spec
from dsexit.data.writer import ShardWriter, StagedOutput

_DOCUMENTS_PER_BATCH = 2000
_BATCH_CHARS = MAX_PIECE_CHARS  # text read ahead for one round of tokenizing and packing
# Text per tokenizer call: a fast tokenizer's working memory is ~200 bytes per character of its input.
_ENCODE_CHARS = 64 << 10
MAX_VALIDATION_FRACTION = 0.5


def _uniform_draw(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): a hash, so it needs no state carried between documents."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_validation_document(seed: int, document_number: int, validation_fraction: float) -> bool:
    """Whether document `document_number` (counted from 0 across all inputs, in order) is held out."""
    return _uniform_draw(seed, f"validation-split:{document_number}") < validation_fraction


def _validation_packer_seed(seed: int) -> int:
    """The validation packer's seed: its own stream, so holding documents out leaves training packing alone."""
    return int(_uniform_draw(seed, "validation-packer") * 2**63)


class Progress:
    """A tqdm bar over the inputs on a terminal; otherwise a plain line every `interval_s` and at the end.
    Messages print above a live bar (through tqdm), as plain lines otherwise."""

    def __init__(self, total_inputs: int, stream=None, interval_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total_inputs, self.interval_s = total_inputs, interval_s
        self.start = self._last = time.monotonic()
        self.bar = None  # opened at the first update, closed at the final one

    def update(self, inputs_done: int, documents: int, samples: int, shards: int, final: bool = False) -> None:
        counts = f"{documents} docs {samples} samples {shards} shards"
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=self.total_inputs, file=self.stream, desc="prepare_data", unit="input", dynamic_ncols=True
                )
            self.bar.update(inputs_done - self.bar.n)
            self.bar.set_postfix_str(counts, refresh=True)
            if final:
                self.bar.close()
                self.bar = None
            return
        now = time.monotonic()
        if not (final or now - self._last >= self.interval_s):
            return
        self._last = now
        self.stream.write(f"prepare_data: {inputs_done}/{self.total_inputs} inputs {counts} {now - self.start:.0f}s\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"prepare_data: {text}", file=self.stream)
            return
        self.stream.write(f"prepare_data: {text}\n")
        self.stream.flush()


def _sentences(sources: list[TextSource]) -> Iterator[str]:
    for source in sources:
        for text, _ in source.documents():
            yield from split_sentences(text)


def _piece_batches(sources: list[TextSource], skipped: SkipReport) -> Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(source number, [(text, continues)]): document pieces in order, a batch bounded in count and characters."""
    batch: list[tuple[str, bool]] = []
    chars = 0
    for number, source in enumerate(sources):
        for piece in source.documents(skipped):
            batch.append(piece)
            chars += len(piece[0])
            if len(batch) == _DOCUMENTS_PER_BATCH or chars >= _BATCH_CHARS:
                yield number, batch
                batch, chars = [], 0
    if batch:
        yield len(sources) - 1, batch


def _encode(tokenizer, sentences: list[str]) -> list[list[int]]:
    """Token ids of each sentence, the text going through the tokenizer in calls of about _ENCODE_CHARS.

    A longer sentence is cut after whitespace, where both WordPiece and SentencePiece
    split words anyway, so its ids are those of the whole sentence.
    """
    ids: list[list[int]] = [[] for _ in sentences]
    group: list[str] = []
    owners: list[int] = []  # the sentence each text in the group belongs to
    chars = 0

    def flush() -> None:
        for owner, piece_ids in zip(owners, tokenizer.encode_batch(group)):
            ids[owner] += piece_ids
        group.clear()
        owners.clear()

    for number, sentence in enumerate(sentences):
        for piece in cut_text(sentence, _ENCODE_CHARS):
            group.append(piece)
            owners.append(number)
            chars += len(piece)
            if chars >= _ENCODE_CHARS:
                flush()
                chars = 0
    if group:
        flush()
    return ids


def prepare_dataset(
    inputs: list[str],
    out_url: str,
    tokenizer_spec: str,
    seq_len: int = 128,
    shard_mb: float = 64,
    overwrite: bool = False,
    text_field: str = "text",
    seed: int = 0,
    storage_options: dict | None = None,
    progress_stream=None,
    validation_fraction: float = 0.02,
    encoding: str = "utf-8",
    undecodable: str = "error",
) -> DatasetIndex:
    """Tokenize, pack and shard the inputs into a dataset at out_url; returns its index.

    About `validation_fraction` of the documents (0 = none) are held out whole
    into validation shards (`DatasetIndex.validation_shards`), never trained on.
    If the draw holds out no document but there are at least two, the last
    document is held out, so a small corpus still gets a validation split.

    Text files are decoded with `encoding`; binary input is an error, and so are
    undecodable bytes unless `undecodable="skip"` (their lines are skipped and
    counted). out_url must be absent, empty, or a dsexit dataset (replaced only
    with `overwrite`, and only the files its index lists); nothing there changes
    unless the new dataset is complete.
    """
    parse_tokenizer_spec(tokenizer_spec)
    if seq_len < 8:
        raise ValueError(f"--seq-len must be at least 8, got {seq_len}.")
    if shard_mb <= 0:
        raise ValueError(f"--shard-mb must be positive, got {shard_mb}.")
    if not 0 <= validation_fraction < MAX_VALIDATION_FRACTION:
        raise ValueError(f"--validation-fraction must be in [0, {MAX_VALIDATION_FRACTION}), got {validation_fraction}.")
    sources = resolve_inputs(inputs, text_field, storage_options, encoding, undecodable)
    for source in sources:
        source.check()
    output = StagedOutput(out_url, overwrite, storage_options)
    progress = Progress(len(sources), progress_stream)

    with tempfile.TemporaryDirectory(prefix="dsexit-spm-") as work_dir:
        if tokenizer_spec.startswith("train:"):
            progress.message(f"training SentencePiece ({tokenizer_spec}) on {len(sources)} inputs")
        started = time.monotonic()
        tokenizer = load_tokenizer(tokenizer_spec, lambda: _sentences(sources), work_dir)
        progress.message(
            f"tokenizer {tokenizer.kind} vocab {tokenizer.vocab_size} ready in {time.monotonic() - started:.1f}s"
        )
        with output:
            writer = ShardWriter(output.staging_url, tokenizer, seq_len, int(shard_mb * (1 << 20)), storage_options)
            skipped = SkipReport()
            documents, validation_documents = _pack(sources, writer, seed, validation_fraction, skipped, progress)
            index = output.publish(writer.finish())
    progress.update(len(sources), documents, index.num_samples, len(index.shards), final=True)
    if skipped.lines:
        progress.message(
            f"skipped {skipped.lines} line(s) holding bytes that are not {encoding} (first: {skipped.first})"
        )
    progress.message(
        f"wrote {index.num_samples} samples, {index.num_tokens} tokens, {len(index.shards)} shards to {out_url}"
    )
    if index.validation_shards:
        progress.message(
            f"held out {validation_documents} of {documents} documents for validation: "
            f"{index.num_validation_samples} samples, {len(index.validation_shards)} shards"
        )
    return index


def _pack(
    sources: list[TextSource],
    writer: ShardWriter,
    seed: int,
    validation_fraction: float,
    skipped: SkipReport,
    progress: Progress,
) -> tuple[int, int]:
    """Tokenize and pack every document into the writer's two splits; returns (documents, held-out documents)."""
    special = writer.tokenizer.special_tokens
    packer = SequencePacker(writer.index.seq_len, special["cls"], special["sep"], special["pad"], seed=seed)
    validation_packer = SequencePacker(
        writer.index.seq_len, special["cls"], special["sep"], special["pad"], seed=_validation_packer_seed(seed)
    )
    documents = validation_documents = 0
    validation = False  # the side of the document the current piece belongs to
    # The latest training piece waits here, unpacked, until the next one arrives: if the draw holds out
    # nothing and it is a whole document, it is the one moved to validation; training order is kept either way.
    held_back: list[list[int]] | None = None
    held_back_is_whole = False
    samples = 0

    def pack_held_back() -> None:
        nonlocal samples
        if held_back is not None:
            rows = packer.add_document(held_back)
            writer.add_rows(rows)
            samples += len(rows)

    for source_number, batch in _piece_batches(sources, skipped):
        split = [split_sentences(text) for text, _ in batch]
        encoded = iter(_encode(writer.tokenizer, [sentence for sentences in split for sentence in sentences]))
        for (_, continues), sentences in zip(batch, split):
            piece = [next(encoded) for _ in sentences]
            if not continues:
                validation = is_validation_document(seed, documents, validation_fraction)
                validation_documents += validation
                documents += 1
            if validation:
                writer.add_validation_rows(validation_packer.add_document(piece))
            elif piece:  # an empty piece packs to nothing; holding it back would hold out nothing
                pack_held_back()
                held_back, held_back_is_whole = piece, not continues
            elif continues:
                held_back_is_whole = False
        progress.update(source_number, documents, samples, len(writer.index.shards))
    if held_back is not None and validation_fraction > 0 and validation_documents == 0 and documents >= 2:
        if held_back_is_whole:
            progress.message(
                f"no document was drawn for validation at fraction {validation_fraction} "
                f"of {documents} documents; holding out the last document instead"
            )
            writer.add_validation_rows(validation_packer.add_document(held_back))
            return documents, 1
        progress.message(
            f"no document was drawn for validation at fraction {validation_fraction} of {documents} "
            f"documents, and the last one is too long to hold out whole; no validation split"
        )
    pack_held_back()
    return documents, validation_documents
