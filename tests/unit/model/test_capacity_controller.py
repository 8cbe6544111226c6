"""The capacity controller: one knob (the level), starting at full depth, changed at most every N steps,
toward the target compute but never below what the floor allows; heads at the prior keep full depth."""

import pytest
import torch

from dsexit.model import (
    CapacityController,
    CapacitySchedule,
    ElectraExitConfig,
    ElectraPreTrainingModel,
    ExitController,
    ExitDecision,
    exit_controller_for,
)
from dsexit.model.capacity import LEVELS

from .conftest import VOCAB, make_batch

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _discriminator(config):
    torch.manual_seed(0)
    return ElectraPreTrainingModel(config).discriminator.eval()


def _step(config, discriminator, controller, step, batch):
    """One forward at the controller's setting; feeds the controller back as the trainer does."""
    input_ids, attention_mask, token_type_ids = batch
    level, tau = controller.capacity(step), controller.threshold(step)
    capacity = None if level is None else CapacitySchedule.at_level(config, level)
    decision = ExitDecision.for_config(
        config, threshold=tau, capacity=capacity, min_confidence=controller.min_confidence
    )
    with torch.no_grad():
        state = discriminator(input_ids, attention_mask, token_type_ids, decision=decision)
    fraction = float(sum(work.token_layers for work in state.work) / (state.exitable.sum() * config.num_hidden_layers))
    counts = state.floor_counts_by_layer(config.num_hidden_layers)
    controller.update(fraction, step, floor_counts=(counts[0].tolist(), counts[1].tolist()))
    return fraction, level


@pytest.mark.parametrize("routing", ["capacity", "random"])
@pytest.mark.parametrize("target", [0.75, 0.5])
def test_the_level_starts_at_full_depth_changes_every_n_steps_and_reaches_the_target(routing, target):
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_routing=routing, **NO_DROPOUT)
    discriminator = _discriminator(config)
    with torch.no_grad():  # spread the heads' confidences, as trained heads have
        for head in discriminator.exit_heads.values():
            head.dense_prediction.weight.mul_(300)
    controller = exit_controller_for(config, target_compute=target, warmup_steps=2, min_confidence=0.25)
    controller.interval = 3
    assert isinstance(controller, CapacityController)
    batch = make_batch(4, 32, seed=2)
    steps = [_step(config, discriminator, controller, step, batch) for step in range(2 + 3 * 4)]
    levels = [level for _, level in steps]
    assert levels[:2] == [None, None]  # warm-up: no exit
    assert levels[2:5] == [LEVELS] * 3  # full depth until the first window is measured
    for start in range(2, len(levels), 3):  # one level per window of 3 steps
        assert len(set(levels[start : start + 3])) == 1
    settled = [fraction for fraction, _ in steps[-3:]]
    assert abs(sum(settled) / len(settled) - target) <= 1 / 16, settled
    assert not controller.at_floor


def _at_the_prior(routing, exit_criterion="prior_margin"):
    """Every head predicts the replacement rate for every token: bias at the prior's log-odds, zero weights."""
    config = ElectraExitConfig.from_preset(
        "electra-tiny",
        vocab_size=VOCAB,
        exit_routing=routing,
        exit_criterion=exit_criterion,
        head_bias_init="prior",
        **NO_DROPOUT,
    )
    discriminator = _discriminator(config)
    with torch.no_grad():
        for head in (discriminator.discriminator_predictions, *discriminator.exit_heads.values()):
            head.dense_prediction.weight.zero_()
    return config, discriminator


@pytest.mark.parametrize("routing", ["threshold", "capacity", "random"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_heads_at_the_prior_keep_full_depth_under_every_routing_whatever_the_target(routing, target):
    config, discriminator = _at_the_prior(routing)
    controller = exit_controller_for(config, target_compute=target, min_confidence=0.25, capacity_interval=2)
    batch = make_batch(4, 32, seed=3)
    fractions = [_step(config, discriminator, controller, step, batch)[0] for step in range(12)]
    assert fractions == [1.0] * 12
    assert controller.at_floor  # what the log line reports: the floor holds compute above the target
    if routing != "threshold":
        assert controller.level == LEVELS and controller.floor_allows == 1.0


def test_a_floor_the_heads_clear_lets_the_level_fall():
    """Under `confidence` a head at the prior scores |2p-1| = 0.7 on every token: above a floor of 0.6 every
    token could leave at the first head, so the target decides; above 0.75 none could, full depth stays."""
    for floor, falls in ((0.6, True), (0.75, False)):
        config, discriminator = _at_the_prior("capacity", exit_criterion="confidence")
        controller = CapacityController(config, target_compute=0.5, min_confidence=floor, interval=2)
        batch = make_batch(4, 32, seed=3)
        for step in range(6):
            _step(config, discriminator, controller, step, batch)
        assert (controller.level < LEVELS) == falls, floor


def test_levels_with_the_same_schedule_are_never_both_visited():
    """The least compute a schedule can plan is reached by several levels (one bucket after every head):
    the controller always takes the highest of them, so a compiled step compiles that schedule once."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)
    controller = CapacityController(config, target_compute=0.05, interval=1)
    floor_counts = ([10.0] * 4, [10.0] * 4)  # every token above the floor at the first head
    controller.update(1.0, step=0, floor_counts=floor_counts)
    lowest = controller.level
    same = [level for level in range(1, LEVELS + 1) if controller.planned(level) == controller.planned(lowest)]
    assert len(same) > 1 and lowest == max(same)


def test_the_controller_state_round_trips_and_a_threshold_state_starts_at_full_depth():
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_routing="capacity")
    controller = CapacityController(config, target_compute=0.5, warmup_steps=1, interval=2)
    floor_counts = ([10.0] * 4, [10.0] * 4)
    for step in range(4):
        controller.update(1.0, step, floor_counts=floor_counts)
    assert controller.level < LEVELS and controller.window.steps == 1
    restored = CapacityController(config, target_compute=0.5, warmup_steps=1, interval=2)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    threshold_state = ExitController(config, target_compute=0.5).state_dict()
    fresh = CapacityController(config, target_compute=0.5)
    fresh.load_state_dict(threshold_state)
    assert fresh.level == LEVELS and fresh.capacity(0) == LEVELS
    assert isinstance(exit_controller_for(ElectraExitConfig.from_preset("electra-tiny")), ExitController)
