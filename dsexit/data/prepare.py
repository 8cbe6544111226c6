"""The data preparation pipeline behind `launch/prepare_data.py`.

This module owns the order of work: validate every argument before any work,
train or load the tokenizer, stream documents through sentence splitting, batch
encoding and the BERT/ELECTRA packer into the shard writer, and report progress
(a bar on a terminal, plain log lines otherwise).

It also owns the held-out split: each document goes, whole, to training or to
validation by a draw from (seed, document number) alone (`is_validation_document`),
and each side has its own packer, so no sample mixes the two and the split does
not depend on batching, input sizes or the tokenizer.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Iterator

from dsexit.data.index import DatasetIndex
from dsexit.data.packing import SequencePacker
from dsexit.data.sources import TextSource, resolve_inputs, split_sentences
from dsexit.data.tokenizer import load_tokenizer, parse_tokenizer_spec
from dsexit.data.writer import ShardWriter, claim_output

_DOCUMENTS_PER_BATCH = 2000
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
    """A one-line bar on a TTY; otherwise a plain line every `interval_s` and at the end."""

    def __init__(self, total_inputs: int, stream=None, interval_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total_inputs, self.interval_s = total_inputs, interval_s
        self.start = self._last = time.monotonic()

    def update(self, inputs_done: int, documents: int, samples: int, shards: int, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or self.tty or now - self._last >= self.interval_s):
            return
        self._last = now
        stats = f"{inputs_done}/{self.total_inputs} inputs {documents} docs {samples} samples {shards} shards {now - self.start:.0f}s"
        if self.tty:
            filled = int(20 * inputs_done / max(1, self.total_inputs))
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {stats}" + ("\n" if final else ""))
        else:
            self.stream.write(f"prepare_data: {stats}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(f"prepare_data: {text}\n")
        self.stream.flush()


def _sentences(sources: list[TextSource]) -> Iterator[str]:
    for source in sources:
        for document in source.documents():
            yield from split_sentences(document)


def _document_batches(sources: list[TextSource]) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    for number, source in enumerate(sources):
        for document in source.documents():
            batch.append(document)
            if len(batch) == _DOCUMENTS_PER_BATCH:
                yield number, batch
                batch = []
    if batch:
        yield len(sources) - 1, batch


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
) -> DatasetIndex:
    """Tokenize, pack and shard the inputs into a dataset at out_url; returns its index.

    About `validation_fraction` of the documents (0 = none) are held out whole
    into validation shards (`DatasetIndex.validation_shards`), never trained on.
    If the draw holds out no document but there are at least two, the last
    document is held out, so a small corpus still gets a validation split.
    """
    parse_tokenizer_spec(tokenizer_spec)
    if seq_len < 8:
        raise ValueError(f"--seq-len must be at least 8, got {seq_len}.")
    if shard_mb <= 0:
        raise ValueError(f"--shard-mb must be positive, got {shard_mb}.")
    if not 0 <= validation_fraction < MAX_VALIDATION_FRACTION:
        raise ValueError(f"--validation-fraction must be in [0, {MAX_VALIDATION_FRACTION}), got {validation_fraction}.")
    sources = resolve_inputs(inputs, text_field, storage_options)
    claim_output(out_url, overwrite, storage_options)
    progress = Progress(len(sources), progress_stream)

    if tokenizer_spec.startswith("train:"):
        progress.message(f"training SentencePiece ({tokenizer_spec}) on {len(sources)} inputs")
    started = time.monotonic()
    tokenizer = load_tokenizer(tokenizer_spec, lambda: _sentences(sources))
    progress.message(f"tokenizer {tokenizer.kind} vocab {tokenizer.vocab_size} ready in {time.monotonic() - started:.1f}s")

    special = tokenizer.special_tokens
    packer = SequencePacker(seq_len, special["cls"], special["sep"], special["pad"], seed=seed)
    validation_packer = SequencePacker(seq_len, special["cls"], special["sep"], special["pad"], seed=_validation_packer_seed(seed))
    writer = ShardWriter(out_url, tokenizer, seq_len, int(shard_mb * (1 << 20)), storage_options)
    documents = samples = validation_documents = 0
    # The latest training document waits here, unpacked, until the next one arrives: if the draw
    # holds out nothing, it is the one moved to validation, and training order is kept either way.
    held_back: list[list[int]] | None = None
    for source_number, batch in _document_batches(sources):
        split = [split_sentences(document) for document in batch]
        encoded = iter(tokenizer.encode_batch([sentence for sentences in split for sentence in sentences]))
        for sentences in split:
            document = [next(encoded) for _ in sentences]
            if is_validation_document(seed, documents, validation_fraction):
                writer.add_validation_rows(validation_packer.add_document(document))
                validation_documents += 1
            elif document:  # an empty document packs to nothing; holding it back would hold out nothing
                if held_back is not None:
                    rows = packer.add_document(held_back)
                    writer.add_rows(rows)
                    samples += len(rows)
                held_back = document
            documents += 1
        progress.update(source_number, documents, samples, len(writer.index.shards))
    if held_back is not None:
        if validation_fraction > 0 and validation_documents == 0 and documents >= 2:
            progress.message(f"no document was drawn for validation at fraction {validation_fraction} "
                             f"of {documents} documents; holding out the last document instead")
            writer.add_validation_rows(validation_packer.add_document(held_back))
            validation_documents += 1
        else:
            rows = packer.add_document(held_back)
            writer.add_rows(rows)
            samples += len(rows)
    index = writer.finish()
    progress.update(len(sources), documents, samples, len(index.shards), final=True)
    progress.message(f"wrote {index.num_samples} samples, {index.num_tokens} tokens, {len(index.shards)} shards to {out_url}")
    if index.validation_shards:
        progress.message(f"held out {validation_documents} of {documents} documents for validation: "
                         f"{index.num_validation_samples} samples, {len(index.validation_shards)} shards")
    return index
