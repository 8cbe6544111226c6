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


def test_unnormalised_rows_sample_like_their_normalised_softmax():
    probs = torch.tensor([[4.0, 1.0, 0.0, 3.0]]).repeat(40_000, 1)  # sums to 8: the CDF is rescaled
    draws = CorruptionMixin.sample_from_probs(probs, torch.Generator().manual_seed(4))
    counts = torch.bincount(draws, minlength=4).double()
    assert (counts / counts.sum() - torch.tensor([0.5, 0.125, 0.0, 0.375], dtype=torch.double)).abs().max() < 0.01


def test_the_fused_masked_lm_loss_is_cross_entropy_over_valid_slots_and_returns_its_softmax():
    """Slots past a sequence's count carry weight 0: the loss and its gradient equal cross-entropy
    with `ignore_index` on those rows."""
    from dsexit.model.pretraining import MaskedLMLoss

    logits = torch.randn(37, 301, dtype=torch.double, requires_grad=True)
    targets = torch.randint(0, 301, (37,))
    valid = torch.rand(37) < 0.7
    weights = valid.double() / valid.sum()
    loss, probs = MaskedLMLoss.apply(logits, targets, weights)
    reference_logits = logits.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(reference_logits, torch.where(valid, targets, -100))
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(probs, torch.softmax(logits.detach(), -1))
    assert not probs.requires_grad
    (loss * 3.0).backward()
    (reference * 3.0).backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)
    assert not logits.grad[~valid].any()
    small_logits = logits.detach()[:6, :11].clone().requires_grad_()  # numerical Jacobian: one pass per entry
    small_targets, small_weights = targets[:6] % 11, weights[:6]
    assert torch.autograd.gradcheck(lambda x: MaskedLMLoss.apply(x, small_targets, small_weights)[0], (small_logits,))


def _full_cdf_draws(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The one-level inverse CDF in float64, the same uniform number per row."""
    uniform = torch.rand(probs.shape[0], 1, generator=generator).double()
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(-1)


def test_the_two_level_cdf_draws_what_the_full_cdf_draws():
    """Blocks of 128 entries, then the entries of one block: the token the one-level CDF (in float64)
    gives for the same uniform number, but where rounding moves a boundary (about one row in 2,000)."""
    torch.manual_seed(6)
    for width in (30_522, 128, 300, 7):
        probs = torch.softmax(torch.randn(4_000, width) * 3, dim=-1)
        draws = CorruptionMixin.sample_from_probs(probs, torch.Generator().manual_seed(7))
        reference = _full_cdf_draws(probs, torch.Generator().manual_seed(7))
        assert (draws == reference).double().mean() > 0.997, width


def test_the_two_level_cdf_never_draws_an_entry_of_zero_probability():
    """Zero entries inside blocks, whole blocks of zeros, and the short last block (300 = 2 x 128 + 44)."""
    probs = torch.rand(20_000, 300)
    probs[:, 100:260] = 0.0
    probs[:, 1::3] = 0.0
    probs[:, 299] = 0.0
    draws = CorruptionMixin.sample_from_probs(probs, torch.Generator().manual_seed(8))
    assert bool((probs.gather(1, draws[:, None]) > 0).all())
    assert draws.max() < 299 and draws.min() >= 0
