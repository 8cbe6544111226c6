"""Held-out evaluation: metrics against independent computations, baselines, RNG isolation."""

import math

import numpy as np
import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.train.config import TrainConfig
from dsexit.train.heldout import EVAL_FIELDS, HeldOutEvaluator, Standing, binary_entropy, roc_auc

VOCAB = 300


def _samples(count=24, seq_len=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB, size=(count, seq_len))
    ids[:, 0] = 101
    ids[:, 15] = 102
    ids[:, -1] = 102
    ids[::3, 20:] = 0  # padding in some samples
    return ids


def _model(**overrides):
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, **overrides)
    return ElectraPreTrainingModel(config)


def test_roc_auc_matches_the_pairwise_definition():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=generator).float()  # many ties
    labels = torch.rand(200, generator=generator) < 0.3
    positives, negatives = scores[labels], scores[~labels]
    pairs = (positives[:, None] > negatives[None, :]).double() + 0.5 * (
        positives[:, None] == negatives[None, :]
    ).double()
    assert roc_auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert math.isnan(roc_auc(scores, torch.zeros(200, dtype=torch.bool)))


def test_evaluation_reports_every_field_against_independent_computations():
    model = _model(head_bias_init="prior")
    samples = _samples()
    counts = np.bincount(samples.reshape(-1), minlength=VOCAB)
    evaluator = HeldOutEvaluator(samples, model.config, unigram_counts=counts, seed=3, batch_size=7)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    results = evaluator.evaluate(model, exit_threshold=0.5)
    assert torch.equal(torch.rand(3), before)  # the training RNG stream is untouched
    assert set(EVAL_FIELDS) <= set(results)
    assert all(math.isfinite(results[name]) for name in EVAL_FIELDS)
    # Full depth, uniform corruption: recompute the loss directly from the discriminator.
    ids = torch.from_numpy(samples)
    real = ids != 0
    corrupted = ids.clone()
    corrupted[: len(ids)] = evaluator.corruption.uniform_ids
    labels = (corrupted != ids).float()
    model.eval()
    with torch.no_grad():
        logits = model.discriminator(corrupted, real.long(), evaluator.token_type_ids).logits
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[real], labels[real])
    assert results["eval_rtd_loss_uniform"] == pytest.approx(float(expected), rel=1e-5)
    assert results["eval_rtd_auc_uniform"] == pytest.approx(roc_auc(logits[real], labels[real]), abs=1e-9)
    # The prior baseline: binary entropy of the replacement rate on replaceable positions only.
    replaceable = real & ~torch.isin(ids, torch.tensor([101, 102, 103]))  # specials are never replaced
    rate = float(labels[replaceable].mean())
    assert 0.08 < rate < 0.22
    expected_prior = binary_entropy(rate) * float(replaceable.sum()) / float(real.sum())
    assert results["rtd_prior_entropy"] == pytest.approx(expected_prior, rel=1e-9)
    # An MLM generator at init is close to uniform over the vocabulary.
    assert results["eval_mlm_loss"] == pytest.approx(math.log(VOCAB), rel=0.05)
    assert 0.0 < results["eval_compute_fraction"] <= 1.0
    # Same model, same seed: the same numbers (fixed corruption, fixed generator sampling).
    assert evaluator.evaluate(model, exit_threshold=0.5) == results


def test_evaluation_under_capacity_routing_runs_the_level_it_is_given():
    """The exit rule's figures at a capacity level: the discriminator at that level, computed directly."""
    from dsexit.model import CapacitySchedule, ExitDecision

    model = _model(exit_routing="capacity")
    samples = _samples()
    evaluator = HeldOutEvaluator(samples, model.config, unigram_counts=np.ones(VOCAB), seed=3, batch_size=64)
    results = evaluator.evaluate(model, exit_threshold=None, exit_capacity=8)
    ids = torch.from_numpy(samples)
    real = ids != 0
    decision = ExitDecision.for_config(model.config, capacity=CapacitySchedule.at_level(model.config, 8))
    with torch.no_grad():
        state = model.eval().discriminator(
            evaluator.corruption.uniform_ids, real.long(), evaluator.token_type_ids, decision=decision
        )
    labels = evaluator.corruption.uniform_labels
    expected = torch.nn.functional.binary_cross_entropy_with_logits(state.logits[real], labels[real])
    assert results["eval_rtd_loss_uniform_exit"] == pytest.approx(float(expected), rel=1e-5)
    executed = float(sum(work.token_layers for work in state.work))
    assert results["eval_compute_fraction"] == pytest.approx(executed / (float(state.exitable.sum()) * 4))
    assert results["eval_compute_fraction"] < 0.8


def _pairwise_auc(scores: list[float], labels: list[bool]) -> float:
    """The probability that a random positive outscores a random negative (ties count half), by
    comparing every pair: the definition, with none of roc_auc's ranking."""
    positives = [score for score, label in zip(scores, labels) if label]
    negatives = [score for score, label in zip(scores, labels) if not label]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("batch_size", [5, 64])
def test_accumulated_accuracy_auc_and_loss_equal_a_direct_computation_over_all_tokens(batch_size):
    """Sums over batches of any size give the whole-set loss, accuracy and AUC."""
    model = _model(head_bias_init="prior")
    samples = _samples(count=20)
    counts = np.bincount(samples.reshape(-1), minlength=VOCAB)
    evaluator = HeldOutEvaluator(samples, model.config, unigram_counts=counts, seed=5, batch_size=batch_size)
    results = evaluator.evaluate(model, exit_threshold=None)
    ids = torch.from_numpy(samples)
    real = ids != 0
    corrupted = evaluator.corruption.uniform_ids
    model.eval()
    with torch.no_grad():
        logits = model.discriminator(corrupted, real.long(), evaluator.token_type_ids).logits[real].double()
    labels = (corrupted != ids)[real]
    probabilities = 1 / (1 + torch.exp(-logits))
    loss = -torch.where(labels, torch.log(probabilities), torch.log(1 - probabilities)).mean()
    assert results["eval_rtd_loss_uniform"] == pytest.approx(float(loss), rel=1e-5)
    assert results["eval_rtd_acc_uniform"] == pytest.approx(float(((logits > 0) == labels).double().mean()), abs=1e-12)
    assert results["eval_rtd_auc_uniform"] == pytest.approx(_pairwise_auc(logits.tolist(), labels.tolist()), abs=1e-6)
    assert results["eval_rtd_loss_uniform_exit"] == pytest.approx(results["eval_rtd_loss_uniform"], rel=1e-6)  # no exit
    assert results["eval_compute_fraction"] == 1.0


def test_a_head_at_the_prior_scores_the_prior_entropy():
    """A discriminator whose final head outputs the replacement rate's log-odds on replaceable
    tokens (and -inf-like on specials) scores about the prior baseline."""
    model = _model(head_bias_init="prior", exit_enabled=False, generator="uniform")
    samples = _samples(count=64)
    counts = np.bincount(samples.reshape(-1), minlength=VOCAB)
    evaluator = HeldOutEvaluator(samples, model.config, unigram_counts=counts, seed=0)
    with torch.no_grad():
        model.discriminator.discriminator_predictions.dense_prediction.weight.zero_()
    results = evaluator.evaluate(model, exit_threshold=None)
    # Predicting the masking rate everywhere costs more than the prior, which knows specials.
    assert results["eval_rtd_loss_uniform"] > results["rtd_prior_entropy"]
    assert results["eval_rtd_loss_uniform"] == pytest.approx(binary_entropy(0.15), abs=0.03)
    assert results["eval_rtd_auc_uniform"] == pytest.approx(0.5)
    assert results["eval_compute_fraction"] == 1.0
    # A uniform generator's MLM loss is the log of the drawable vocabulary.
    assert results["eval_mlm_loss"] == pytest.approx(math.log(VOCAB - 4), rel=1e-4)
    assert results["unigram_entropy"] < math.log(VOCAB - 4)


def test_slices_over_ranks_add_up_to_the_whole():
    model = _model()
    samples = _samples(count=20)
    counts = np.bincount(samples.reshape(-1), minlength=VOCAB)
    whole = HeldOutEvaluator(samples, model.config, unigram_counts=counts, seed=1, world_size=1)
    parts = [
        HeldOutEvaluator(samples, model.config, unigram_counts=counts, seed=1, rank=rank, world_size=2)
        for rank in range(2)
    ]
    assert torch.equal(torch.cat([part.input_ids for part in parts]), whole.input_ids)
    assert torch.equal(torch.cat([part.corruption.uniform_ids for part in parts]), whole.corruption.uniform_ids)
    assert parts[0].baselines == whole.baselines


def test_budget_schedule_warms_up_then_ends_with_the_budget():
    config = TrainConfig()
    config.optim.warmup_steps = 10
    config.training.max_minutes = 30.0
    total = 100000  # a step count the run never reaches: time decides
    assert config.budget_lr_factor(0, total, 0.0) == 0.0
    assert config.budget_lr_factor(5, total, 0.1) == pytest.approx(0.5)
    assert config.budget_lr_factor(50, total, 15.0) == pytest.approx(0.5)
    assert config.budget_lr_factor(90, total, 29.7) == pytest.approx(0.01)
    assert config.budget_lr_factor(95, total, 31.0) == 0.0
    config.training.max_minutes = None  # without a budget, steps decide
    assert config.budget_lr_factor(75000, total, 1e6) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "rtd_loss, auc_generator, rtd_holds, auc_holds",
    [
        (0.30, 0.76, True, True),
        (0.3243, 0.70, True, True),  # both at their bounds: 0.8 x 0.40538 = 0.32430
        (0.33, 0.90, False, True),
        (0.29, 0.69, True, False),
        (0.41, 0.511, False, False),  # the run of issue 26: at the prior
    ],
)
def test_standing_checks_each_criterion_and_says_which_held(rtd_loss, auc_generator, rtd_holds, auc_holds):
    results = {"eval_rtd_loss_uniform": rtd_loss, "rtd_prior_entropy": 0.40538, "eval_rtd_auc_generator": auc_generator}
    standing = Standing.of(results, "mlm")
    assert (standing.rtd_holds, standing.auc_holds, standing.learned) == (rtd_holds, auc_holds, rtd_holds and auc_holds)
    sentence = standing.sentence()
    assert sentence.startswith("the discriminator learned" if rtd_holds and auc_holds else "the discriminator has not")
    assert f"0.8 x the replaced-token prior's 0.4054 ({'yes' if rtd_holds else 'no'})" in sentence
    assert (
        f"own generator's (mlm) corruption {'>=' if auc_holds else '<'} 0.7 ({'yes' if auc_holds else 'no'})"
        in sentence
    )
