"""Capacity routing against independent references: full capacity equals the model without exits, and
any schedule equals a plain loop that runs every layer on every token and applies the chosen exit sets
token by token; the FLOP counter's rows are the rows the matmuls saw; schedules and the floor's counts."""

import pytest
import torch

from dsexit.model import CapacitySchedule, ElectraExitConfig, ElectraPreTrainingModel, ExitDecision
from dsexit.model.capacity import BUCKETS, LEVELS, floor_compute
from dsexit.model.exit_rules import build_exit_rule
from dsexit.model.layers import TokenRouting

from .conftest import VOCAB, make_batch

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(exit_kv="keep", seed=0, **overrides):
    torch.manual_seed(seed)
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_kv=exit_kv, **NO_DROPOUT, **overrides)
    model = ElectraPreTrainingModel(config).eval()
    with torch.no_grad():  # spread the heads' confidences, as trained heads have
        for head in model.discriminator.exit_heads.values():
            head.dense_prediction.weight.mul_(50)
    return model


def _specials(input_ids):
    return (input_ids == 101) | (input_ids == 102)


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_full_capacity_equals_the_model_without_exits(exit_kv, padded):
    """Level 16 lets nothing leave: every head still runs and sorts nothing, every layer runs every row."""
    model = _model(exit_kv)
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=padded, seed=1)
    mask = attention_mask if padded else None
    outputs = []
    for capacity in (None, LEVELS):
        torch.manual_seed(3)
        output = model(input_ids, mask, token_type_ids, exit_capacity=capacity)
        model.zero_grad()
        output.loss.backward()
        gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        outputs.append((output, gradients))
    (dense, dense_gradients), (full, full_gradients) = outputs
    real = attention_mask.bool()
    torch.testing.assert_close(full.discriminator_logits[real], dense.discriminator_logits[real])
    torch.testing.assert_close(full.loss, dense.loss)
    assert torch.equal(full.exit_layer, dense.exit_layer)
    assert float(full.compute_fraction) == 1.0
    for name, gradient in dense_gradients.items():
        torch.testing.assert_close(full_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def _reference(model, input_ids, attention_mask, token_type_ids, schedule: CapacitySchedule):
    """Every layer on every position (the layer's dense path), exited tokens' states kept as they were;
    keys: every real token (keep) or the tokens still running (drop). After each exit head, in each
    sequence, the pinned tokens and then the least confident exitable tokens continue, as many as the
    schedule allows; the others leave with the head's logit."""
    discriminator, config = model.discriminator, model.config
    rule = build_exit_rule(config)
    batch, seq_len = input_ids.shape
    real = attention_mask.bool()
    pinned = _specials(input_ids) & real
    hidden = discriminator.electra.project(discriminator.electra.embeddings(input_ids, token_type_ids))
    running = real.clone()
    logits = torch.zeros(batch, seq_len)
    exit_layer = torch.zeros(batch, seq_len, dtype=torch.long)
    for number in range(1, discriminator.num_layers + 1):
        keys = running if config.exit_kv == "drop" else real
        updated, _ = discriminator.electra.encoder.layer[number - 1](hidden, TokenRouting.all_positions(keys))
        hidden = torch.where(running[..., None], updated, hidden)
        head = discriminator.head_for(number)
        if number == discriminator.num_layers:
            logits = torch.where(running, head(hidden).float(), logits)
            exit_layer = torch.where(running, number, exit_layer)
            break
        if head is None:
            continue
        head_logits = head(hidden).float()
        confidence = rule.confidence(head_logits, number)
        continuing = schedule.rows_after(number, seq_len)
        running = running.clone()  # the layer's `where` saved the old mask for its backward
        for row in range(batch):
            candidates = running[row].nonzero().squeeze(1).tolist()
            ranked = sorted(candidates, key=lambda t: (not bool(pinned[row, t]), float(confidence[row, t])))
            for position in ranked[continuing:]:
                logits[row, position] = head_logits[row, position]
                exit_layer[row, position] = number
                running[row, position] = False
    return logits, exit_layer, torch.where(real[..., None], hidden, 0.0)


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
@pytest.mark.parametrize("level", [12, 8, 5])
def test_capacity_routing_equals_a_loop_over_every_token(exit_kv, level):
    model = _model(exit_kv)
    discriminator = model.discriminator
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True, seed=2)
    real = attention_mask.bool()
    schedule = CapacitySchedule.at_level(model.config, level)
    weights = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(5))

    def gradients_of(loss):
        discriminator.zero_grad()
        loss.backward()
        return {
            name: torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
            for name, parameter in discriminator.named_parameters()
        }

    decision = ExitDecision.for_config(model.config, capacity=schedule)
    state = discriminator(input_ids, attention_mask, token_type_ids, decision=decision)
    hidden = torch.where(real[..., None], state.hidden, 0.0)
    model_gradients = gradients_of((state.logits * weights)[real].sum() + (hidden**2).mean())
    logits, exit_layer, reference_hidden = _reference(model, input_ids, attention_mask, token_type_ids, schedule)
    reference_gradients = gradients_of((logits * weights)[real].sum() + (reference_hidden**2).mean())

    assert torch.equal(state.exit_layer, exit_layer)
    assert len(set(exit_layer[real].tolist())) >= 3  # tokens left at several heads
    torch.testing.assert_close(state.logits[real], logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, reference_hidden, rtol=1e-5, atol=1e-5)
    for name, gradient in reference_gradients.items():
        if "exit_heads" in name or "discriminator_predictions" in name or "layer" in name:
            torch.testing.assert_close(model_gradients[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


def test_pinned_tokens_run_to_the_end_and_the_compute_fraction_counts_exitable_tokens():
    model = _model()
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, seed=4)
    output = model(input_ids, None, token_type_ids, exit_capacity=6)
    specials = _specials(input_ids)
    assert (output.exit_layer[specials] == model.config.num_hidden_layers).all()
    exitable = int((~specials).sum())
    assert output.flops.token_layers_full == exitable * model.config.num_hidden_layers
    # Each head keeps its rows per sequence: the specials, then the exitable rows the capacity leaves room for.
    schedule = CapacitySchedule.at_level(model.config, 6)
    kept = [schedule.rows_after(number, 32) for number in model.config.exit_layers]
    runs = [32, *kept]  # rows that enter layers 1..4 of each sequence
    pinned = int(specials.sum())
    expected = sum(4 * rows - pinned for rows in runs)
    assert int(output.flops.token_layers_executed) == expected


def test_random_routing_keeps_the_same_capacities_and_draws_other_rows():
    confident = _model()
    drawn = _model(exit_routing="random")
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, seed=5)
    torch.manual_seed(0)
    by_confidence = confident(input_ids, None, token_type_ids, exit_capacity=8)
    torch.manual_seed(0)
    at_random = drawn(input_ids, None, token_type_ids, exit_capacity=8)
    for output in (by_confidence, at_random):
        assert (output.exit_layer[_specials(input_ids)] == 4).all()
    assert torch.equal(by_confidence.exit_layer_counts, at_random.exit_layer_counts)  # the same shapes
    assert not torch.equal(by_confidence.exit_layer, at_random.exit_layer)  # not the same tokens


@pytest.mark.parametrize("exit_kv, exit_head", [("keep", "dense"), ("drop", "dense"), ("keep", "linear")])
def test_the_flop_counter_counts_the_rows_the_matmuls_saw(exit_kv, exit_head):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(exit_kv, exit_head=exit_head)
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True, seed=6)
    with FlopCounterMode(display=False) as counted, sdpa_kernel(SDPBackend.MATH):
        output = model(input_ids, attention_mask, token_type_ids, exit_capacity=7)
    assert counted.get_total_flops() == output.flops.forward_flops
    assert output.flops.forward_flops < output.flops.forward_flops_full


def test_schedules_are_buckets_that_only_shrink_and_plan_more_compute_at_higher_levels():
    config = ElectraExitConfig.from_preset("electra-small")
    plans = []
    for level in range(1, LEVELS + 1):
        schedule = CapacitySchedule.at_level(config, level)
        assert all(1 <= buckets <= BUCKETS for buckets in schedule.buckets)
        assert list(schedule.buckets) == sorted(schedule.buckets, reverse=True)
        assert all(schedule.rows_after(number, 128) % (128 // BUCKETS) == 0 for number in config.exit_layers)
        plans.append(schedule.planned_compute(config.num_hidden_layers))
    assert plans == sorted(plans) and plans[-1] == 1.0
    assert CapacitySchedule.at_level(config, LEVELS).buckets == (BUCKETS,) * len(config.exit_layers)
    for target in (0.75, 0.5):  # the levels the study uses plan within a bucket's worth of their share
        level = round(target * LEVELS)
        assert abs(plans[level - 1] - target) < 1 / BUCKETS
    middle = CapacitySchedule.after_layers(config, {6: 0.5})
    assert middle.buckets == (16, 16, 8, 8, 8, 8, 8, 8)
    assert middle.rows_after(6, 100) == 50 and middle.rows_after(4, 100) == 100
    with pytest.raises(ValueError, match="level"):
        CapacitySchedule.at_level(config, 0)
    with pytest.raises(ValueError, match="without an exit head"):
        CapacitySchedule.after_layers(config, {12: 0.5})


def test_the_floor_counts_measure_what_a_threshold_at_the_floor_would_spend():
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)  # heads after layers 1, 2, 3 of 4
    # Half the tokens below the floor so far reach it at the first head, half the rest at the third.
    reaching, confident = [100.0, 50.0, 50.0, 0.0], [50.0, 0.0, 25.0, 0.0]
    assert floor_compute(reaching, confident, config) == pytest.approx((1 + 0.5 + 0.5 + 0.25) / 4)
    assert floor_compute([100.0, 100.0, 100.0, 0.0], [0.0] * 4, config) == 1.0  # nobody confident: full depth


@pytest.mark.parametrize("exit_criterion, confident_share", [("prior_margin", 0.0), ("confidence", 1.0)])
def test_heads_at_the_prior_force_their_exits_below_the_floor_under_prior_margin(exit_criterion, confident_share):
    """Heads that predict the replacement rate everywhere: under prior_margin no token reaches the floor,
    so every exitable token that leaves is counted as forced out; under confidence (|2p-1| = 0.7) all do."""
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=VOCAB, exit_criterion=exit_criterion, head_bias_init="prior", **NO_DROPOUT
    )
    model = ElectraPreTrainingModel(config)
    with torch.no_grad():
        for head in (model.discriminator.discriminator_predictions, *model.discriminator.exit_heads.values()):
            head.dense_prediction.weight.zero_()
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, seed=3)
    output = model(input_ids, None, token_type_ids, exit_capacity=4, min_confidence=0.25)
    left_early = int(((output.exit_layer < 4) & ~_specials(input_ids)).sum())
    assert left_early > 0
    assert int(output.forced_exits) == (left_early if confident_share == 0.0 else 0)
    reaching, confident = output.floor_counts
    assert float(reaching[0]) == int((~_specials(input_ids)).sum())  # every exitable token reaches the first head
    assert float(confident[0]) == confident_share * float(reaching[0])


@pytest.mark.parametrize("exit_supervision", [1.0, 0.25])
def test_every_layer_and_head_runs_on_every_step_even_at_the_lowest_level(exit_supervision):
    """ZeRO-3 gathers each module's parameters around its call: every rank must call the same modules."""
    model = _model(exit_supervision=exit_supervision).train()
    calls: dict[str, int] = {}
    modules = {
        **{f"layer {n}": layer for n, layer in enumerate(model.discriminator.electra.encoder.layer, 1)},
        **{f"head {n}": head for n, head in model.discriminator.exit_heads.items()},
        "final head": model.discriminator.discriminator_predictions,
    }
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True, seed=7)
    output = model(input_ids, attention_mask, token_type_ids, exit_capacity=1)
    output.loss.backward()
    assert calls == {name: 1 for name in modules}
    assert torch.isfinite(output.loss)
    for head in model.discriminator.exit_heads.values():
        assert head.dense_prediction.weight.grad.abs().sum() > 0  # every head trained on the rows it saw
