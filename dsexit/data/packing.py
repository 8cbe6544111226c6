"""BERT/ELECTRA packing of tokenized documents into fixed-length sequences.

This module owns the sample layout: `[CLS] A [SEP] B [SEP] [PAD]...` and how
sentences become segments. It follows google-research/electra's
`build_pretraining_dataset.ExampleBuilder`: sentences of one document accumulate
until they reach the target length, a document boundary always closes the
example (no sample spans two documents), 10% of examples keep everything in
segment A, 5% use a random shorter target length, and the tail is padded.

Deliberate differences, both so that no token of the input is lost or reordered:
- ELECTRA lets the sentences overflow the target and truncates the sample; here a
  sample is closed before the sentence that would overflow it, and a sentence
  longer than `seq_len - 3` tokens is cut into pieces of at most that length.
- ELECTRA can put a later short sentence back into segment A after an earlier one
  went to B; here A is a prefix of the sentences and B the rest, as in BERT, so
  both segments are contiguous text.

Token type ids are derived from the ids, never stored (see `token_type_ids`).
"""

from __future__ import annotations

import random

import numpy as np
import torch


class SequencePacker:
    """Feeds documents (lists of tokenized sentences) in, takes fixed-length rows out."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, seed: int = 0):
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {seq_len}.")
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        self._rng = random.Random(seed)
        self._sentences: list[list[int]] = []
        self._length = 0
        self._target_length = seq_len

    def add_document(self, sentences: list[list[int]]) -> list[list[int]]:
        """Add one document; returns the rows it completed (each exactly seq_len ids)."""
        rows = []
        longest = self.seq_len - 3  # room left by [CLS] and two [SEP]
        for sentence in sentences:
            for start in range(0, len(sentence), longest):
                piece = sentence[start : start + longest]
                if self._length and self._length + len(piece) > self._target_length - 3:
                    rows.append(self._make_row())
                self._sentences.append(piece)
                self._length += len(piece)
        if self._length:  # a document boundary closes the example
            rows.append(self._make_row())
        return rows

    def _make_row(self) -> list[int]:
        if self._rng.random() < 0.1:
            first_target = 1 << 30  # only one segment, as in classification inputs
        else:
            first_target = (self._target_length - 3) // 2  # -3 for [CLS] and two [SEP]
        first: list[int] = []
        second: list[int] = []
        for sentence in self._sentences:
            if not second and (
                not first
                or len(first) + len(sentence) < first_target
                or (len(first) < first_target and self._rng.random() < 0.5)
            ):
                first += sentence
            else:
                second += sentence
        self._sentences, self._length = [], 0
        self._target_length = self._rng.randint(5, self.seq_len) if self._rng.random() < 0.05 else self.seq_len

        row = [self.cls_id, *first, self.sep_id]
        if second:
            row += [*second, self.sep_id]
        return row + [self.pad_id] * (self.seq_len - len(row))


def token_type_ids(input_ids: torch.Tensor | np.ndarray, sep_id: int, pad_id: int):
    """0 up to and including the first [SEP], 1 after it, 0 on padding (ELECTRA's segment ids)."""
    module = torch if isinstance(input_ids, torch.Tensor) else np
    is_sep = (input_ids == sep_id).astype(np.int64) if module is np else (input_ids == sep_id).long()
    seps_before = module.cumsum(is_sep, -1) - is_sep
    segment_b = (seps_before >= 1) & (input_ids != pad_id)
    return segment_b.astype(np.int64) if module is np else segment_b.long()
