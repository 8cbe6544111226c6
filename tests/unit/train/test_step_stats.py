"""`StepStats.reduce` on one process (no process group): means over micro-batches, sums of counts,
stop votes, and a sample digest that depends on which samples the step saw, not on how they were
split into micro-batches or ordered."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dsexit.train.step_stats import StepStats, sample_fingerprints

LAYERS = 4


def _output(loss: float, generator: float, accuracy: float, executed: int, full: int, counts: list[int]):
    return SimpleNamespace(
        generator_loss=torch.tensor(generator),
        discriminator_loss=torch.tensor(loss - generator),
        loss=torch.tensor(loss, requires_grad=True) * 1.0,
        rtd_accuracy=torch.tensor(accuracy),
        tokens_executed=torch.tensor(executed),
        tokens_full=torch.tensor(full),
        exit_layer_counts=torch.tensor(counts),
    )


def _batch(rows: torch.Tensor, pad_from: int | None = None) -> dict[str, torch.Tensor]:
    mask = torch.ones_like(rows)
    if pad_from is not None:
        mask[:, pad_from:] = 0
    return {"input_ids": rows, "attention_mask": mask}


def _samples(count: int = 6, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 30000, (count, seq_len), generator=torch.Generator().manual_seed(seed))


def _digest(micro_batches: list[torch.Tensor]) -> str:
    stats = StepStats(LAYERS)
    for rows in micro_batches:
        stats.add(_output(1.0, 0.5, 0.9, 10, 20, [1, 0, 0, 1]), _batch(rows))
    return stats.reduce(preempted=False, time_limit=False).samples_digest


def test_reduce_on_one_process_averages_the_micro_batches_and_sums_the_counts():
    assert not dist.is_initialized()
    samples = _samples()
    stats = StepStats(LAYERS)
    stats.add(_output(3.0, 1.0, 0.80, executed=30, full=40, counts=[2, 0, 1, 5]), _batch(samples[:3], pad_from=10))
    stats.add(_output(5.0, 2.0, 0.90, executed=10, full=40, counts=[1, 1, 0, 0]), _batch(samples[3:]))
    summary = stats.reduce(preempted=False, time_limit=True, minutes=2.5)
    assert summary.loss == pytest.approx(4.0) and summary.generator_loss == pytest.approx(1.5)
    assert summary.discriminator_loss == pytest.approx(2.5) and summary.rtd_accuracy == pytest.approx(0.85)
    assert summary.compute_fraction == pytest.approx(40 / 80)  # token-weighted, not a mean of fractions
    assert summary.exit_layer_counts == [3, 1, 1, 5]
    assert summary.real_tokens == 3 * 10 + 3 * 12
    assert (summary.stop_preempted, summary.stop_time_limit, summary.minutes) == (False, True, 2.5)


def test_the_digest_names_the_samples_not_their_split_or_order():
    samples = _samples(count=8)
    whole = _digest([samples])
    assert _digest([samples[:3], samples[3:]]) == whole  # another micro-batch split (another world size)
    assert _digest([samples[torch.randperm(8, generator=torch.Generator().manual_seed(1))]]) == whole
    changed = samples.clone()
    changed[5, 7] += 1  # one token of one sample
    assert _digest([changed]) != whole
    assert _digest([samples[:7]]) != whole  # a sample left out
    assert len(whole) == 16 and int(whole, 16) >= 0  # 8 bytes, hex


def test_fingerprints_are_one_int64_per_sample_and_tell_samples_apart():
    samples = _samples(count=64, seq_len=32, seed=3)
    fingerprints = sample_fingerprints(samples)
    assert fingerprints.dtype == torch.int64 and fingerprints.shape == (64,)
    assert len(set(fingerprints.tolist())) == 64
    assert torch.equal(sample_fingerprints(samples[10:20]), fingerprints[10:20])  # per sample, whatever the batch
    swapped = samples.clone()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]
    if swapped[0, 1] != swapped[0, 2]:
        assert sample_fingerprints(swapped)[0] != fingerprints[0]  # the order of tokens counts


def test_capacity_routing_counts_add_up_forced_exits_as_a_share_of_exitable_tokens():
    stats = StepStats(LAYERS)
    samples = _samples()
    for forced, reaching in ((3, [10, 6, 0, 0]), (1, [10, 4, 2, 0])):
        output = _output(1.0, 0.5, 0.9, executed=30, full=40, counts=[2, 0, 1, 5])
        output.forced_exits = torch.tensor(forced)
        output.floor_counts = torch.tensor([reaching, [5, 1, 0, 0]], dtype=torch.float32)
        stats.add(output, _batch(samples[:3]))
    summary = stats.reduce(preempted=False, time_limit=False)
    assert summary.forced_exit_share == pytest.approx(4 / (80 / LAYERS))  # 80 token-layers: 20 exitable tokens
    assert summary.floor_counts == ([20, 10, 2, 0], [10, 2, 0, 0])
    assert summary.exit_layer_counts == [4, 0, 2, 10]  # the histogram is where it was
    without = StepStats(LAYERS)
    without.add(_output(1.0, 0.5, 0.9, executed=30, full=40, counts=[2, 0, 1, 5]), _batch(samples[:3]))
    assert without.reduce(preempted=False, time_limit=False).forced_exit_share == 0.0
