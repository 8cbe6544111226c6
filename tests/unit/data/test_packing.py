"""The BERT/ELECTRA sample layout: [CLS] A [SEP] B [SEP] [PAD]..., documents never mixed."""

import numpy as np
import pytest
import torch

from dsexit.data.packing import SequencePacker, token_type_ids

CLS, SEP, PAD = 101, 102, 0


def _documents(count=40, seed=0):
    """Documents with disjoint token ranges (doc d uses ids d*1000+...), sentences of 1..30 tokens."""
    rng = np.random.default_rng(seed)
    documents = []
    for doc in range(count):
        next_id = 1000 * (doc + 1)
        sentences = []
        for _ in range(rng.integers(1, 12)):
            length = int(rng.integers(1, 30))
            sentences.append(list(range(next_id, next_id + length)))
            next_id += length
        documents.append(sentences)
    return documents


def _segments(row):
    """Split a packed row into (A, B or None, padding length), asserting the layout."""
    row = list(row)
    assert row[0] == CLS
    first_sep = row.index(SEP)
    real = len(row) - row[::-1].index(SEP)  # one past the last [SEP]
    assert all(token == PAD for token in row[real:])
    assert PAD not in row[:real]
    if real - 1 == first_sep:
        return row[1:first_sep], None, len(row) - real
    assert row.count(SEP) == 2
    return row[1:first_sep], row[first_sep + 1 : real - 1], len(row) - real


def test_rows_have_bert_layout_keep_every_token_and_never_cross_documents():
    packer = SequencePacker(64, CLS, SEP, PAD, seed=1)
    seen_pairs = seen_single = 0
    for document in _documents(200):
        packed = []
        for row in packer.add_document(document):
            assert len(row) == 64
            first, second, _ = _segments(row)
            seen_pairs += second is not None
            seen_single += second is None
            packed += first + (second or [])
        # Every token of the document, in order, and nothing from another document.
        assert packed == [token for sentence in document for token in sentence]
    assert seen_pairs > 50 and seen_single > 5, (seen_pairs, seen_single)


def test_document_boundary_closes_a_sample_even_when_short():
    packer = SequencePacker(32, CLS, SEP, PAD)
    rows = packer.add_document([[7, 8, 9]])
    assert rows == [[CLS, 7, 8, 9, SEP] + [PAD] * 27]


def test_long_sentence_is_cut_into_samples_without_losing_tokens():
    packer = SequencePacker(16, CLS, SEP, PAD, seed=3)
    sentence = list(range(1000, 1100))
    rows = packer.add_document([sentence])
    kept = [token for row in rows for token in row if token not in (CLS, SEP, PAD)]
    assert kept == sentence


def test_seq_len_too_small_is_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        SequencePacker(4, CLS, SEP, PAD)


def test_token_type_ids_are_electra_segment_ids():
    row = torch.tensor([[CLS, 5, 6, SEP, 7, 8, SEP, PAD, PAD], [CLS, 5, SEP, PAD, PAD, PAD, PAD, PAD, PAD]])
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0], [0] * 9])
    assert torch.equal(token_type_ids(row, SEP, PAD), expected)
    assert np.array_equal(token_type_ids(row.numpy(), SEP, PAD), expected.numpy())
