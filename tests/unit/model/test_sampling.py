"""Replacement sampling draws from softmax(logits / T), one row at a time."""

import torch

from dsexit.model.pretraining import CorruptionMixin


def test_draws_follow_the_tempered_softmax_of_each_row():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, -3.0], [-1.0, -1.0, 3.0, 0.0, 0.0]])
    rows = logits.repeat(40_000, 1)  # 80k draws, alternating between the two rows
    for temperature in (1.0, 2.0):
        draws = CorruptionMixin.sample_from_logits(rows, temperature, torch.Generator().manual_seed(3))
        for index in range(2):
            counts = torch.bincount(draws[index::2], minlength=5).double()
            expected = torch.softmax(logits[index].double() / temperature, dim=-1)
            assert (counts / counts.sum() - expected).abs().max() < 0.01, (temperature, index)


def test_no_rows_give_no_draws_and_a_seed_repeats_them():
    assert CorruptionMixin.sample_from_logits(torch.zeros(0, 7)).shape == (0,)
    logits = torch.randn(64, 1000)
    first = CorruptionMixin.sample_from_logits(logits, 1.0, torch.Generator().manual_seed(5))
    again = CorruptionMixin.sample_from_logits(logits, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and first.max() < 1000
