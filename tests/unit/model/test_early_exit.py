"""Early exit: frozen states, gradients, key/value dropping, the controller, compute counting."""

import math

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel, ExitController, ExitDecision

from .conftest import VOCAB, make_batch


def _discriminator(exit_kv="keep", seed=0):
    torch.manual_seed(seed)
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=VOCAB, exit_kv=exit_kv, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return ElectraPreTrainingModel(config).discriminator.eval()


def _plan(shape, exit_after: int, rows: list[tuple[int, int]], never: int):
    plan = torch.full(shape, never, dtype=torch.long)
    for row, column in rows:
        plan[row, column] = exit_after
    return plan


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_exited_states_are_frozen_and_others_keep_changing(exit_kv):
    discriminator = _discriminator(exit_kv)
    input_ids, attention_mask, token_type_ids = make_batch(2, 16)
    exited = [(0, 3), (0, 4), (1, 9)]
    decision = ExitDecision(plan=_plan(input_ids.shape, 1, exited, never=99))
    state = discriminator.embed(input_ids, attention_mask, token_type_ids)
    state = discriminator.run_layer(1, state, decision)
    after_exit = state.hidden.clone()
    for number in range(2, discriminator.num_layers + 1):
        state = discriminator.run_layer(number, state, decision)
    for row, column in exited:
        assert torch.equal(state.hidden[row, column], after_exit[row, column])
        assert state.exit_layer[row, column] == 1
    assert not torch.allclose(state.hidden[0, 5], after_exit[0, 5])
    assert (state.exit_layer[attention_mask.bool()] >= 1).all()


def test_gradients_reach_every_exit_head_and_early_layers(tiny_model):
    input_ids, attention_mask, token_type_ids = make_batch(4, 32)
    # Half the tokens leave after layer 1: the final head sees only the other half.
    plan = torch.where(torch.rand(input_ids.shape) < 0.5, 1, 99)
    output = tiny_model(input_ids, attention_mask, token_type_ids, exit_plan=plan)
    output.loss.backward()
    assert 0.0 < output.compute_fraction < 1.0
    for name, parameter in tiny_model.named_parameters():
        assert parameter.grad is not None, name
        if "exit_heads" in name or ".layer.0." in name or "word_embeddings" in name:
            assert parameter.grad.abs().sum() > 0, name


def test_dropped_keys_equal_each_sequence_run_alone_on_its_active_tokens():
    """exit_kv="drop": a sequence's active tokens attend only to each other, so every layer must equal
    the plain layer run on that sequence's active tokens alone, packed as a sequence of their own.
    Checked against that reference (logits, final states, every gradient), with tokens exiting after
    layers 1, 2 and 3 (the model carries routed rows from layer to layer and writes exited tokens'
    states only when `hidden` is read)."""
    from dsexit.model.layers import TokenRouting

    discriminator = _discriminator("drop")
    input_ids, attention_mask, token_type_ids = make_batch(4, 24, pad_tail=True)
    draw = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(4))
    plan = torch.where(draw < 0.25, 1, torch.where(draw < 0.5, 2, torch.where(draw < 0.75, 3, 99)))
    real = attention_mask.bool()
    weights = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(5))
    layers = discriminator.num_layers

    def gradients_of(loss):
        discriminator.zero_grad()
        loss.backward()
        return {name: parameter.grad.clone() for name, parameter in discriminator.named_parameters()}

    state = discriminator(input_ids, attention_mask, token_type_ids, decision=ExitDecision(plan=plan))
    # Nothing was written into the [B, T, H] states since layer 1: the tokens that left after layers 2
    # and 3 wait in `deferred`, the rest are carried.
    assert [len(update.index) for update in state.deferred] == [((plan == k) & real).sum() for k in (2, 3)]
    model_logits, model_hidden = state.logits[real], state.hidden[real]
    model_gradients = gradients_of((model_logits * weights[real]).sum() + (model_hidden**2).mean())

    embedded = discriminator.electra.project(discriminator.electra.embeddings(input_ids, token_type_ids))
    reference_logits, reference_hidden = [], []
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        hidden = embedded[row, :length]
        logits = torch.zeros(length)
        active = torch.ones(length, dtype=torch.bool)
        for number in range(1, layers + 1):
            positions = active.nonzero().squeeze(1)
            alone = TokenRouting.all_positions(torch.ones(1, len(positions), dtype=torch.long))
            updated, _ = discriminator.electra.encoder.layer[number - 1](hidden[positions][None], alone)
            hidden = hidden.index_copy(0, positions, updated[0])
            leaving = positions if number == layers else positions[plan[row, positions] <= number]
            head_logits = discriminator.head_for(number)(hidden[leaving]).float()
            logits = logits.index_copy(0, leaving, head_logits)
            active[leaving] = False
        reference_logits.append(logits)
        reference_hidden.append(hidden)
    reference_logits, reference_hidden = torch.cat(reference_logits), torch.cat(reference_hidden)
    reference_gradients = gradients_of((reference_logits * weights[real]).sum() + (reference_hidden**2).mean())

    torch.testing.assert_close(model_logits, reference_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model_hidden, reference_hidden, rtol=1e-5, atol=1e-5)
    for name, gradient in reference_gradients.items():
        torch.testing.assert_close(model_gradients[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("exit_kv, changes_expected", [("drop", False), ("keep", True)])
def test_dropped_exited_tokens_change_no_later_attention(exit_kv, changes_expected):
    discriminator = _discriminator(exit_kv=exit_kv)
    input_ids, attention_mask, token_type_ids = make_batch(2, 16)
    exited = [(0, 2), (0, 7), (1, 5)]
    decision = ExitDecision(plan=_plan(input_ids.shape, 1, exited, never=99))

    def run_after_layer_one(perturb: bool):
        torch.manual_seed(5)
        state = discriminator.embed(input_ids, attention_mask, token_type_ids)
        state = discriminator.run_layer(1, state, decision)
        if perturb:
            hidden = state.hidden.clone()
            for row, column in exited:
                hidden[row, column] = 10 * torch.randn(hidden.shape[-1])
            state.hidden = hidden
        for number in range(2, discriminator.num_layers + 1):
            state = discriminator.run_layer(number, state, decision)
        return state

    with torch.no_grad():
        plain, perturbed = run_after_layer_one(False), run_after_layer_one(True)
    active = plain.exit_layer == discriminator.num_layers
    difference = (plain.hidden[active] - perturbed.hidden[active]).abs().max()
    if changes_expected:
        assert difference > 1e-3  # with exit_kv="keep" exited tokens remain keys: the test can fail
    else:
        assert difference == 0


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_controller_reaches_target_compute_on_stationary_input(target):
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=VOCAB, exit_threshold=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    discriminator = ElectraPreTrainingModel(config).discriminator.eval()
    with torch.no_grad():  # spread the heads' confidences, as trained heads would have
        for head in discriminator.exit_heads.values():
            head.dense_prediction.weight.mul_(300)
    input_ids, attention_mask, token_type_ids = make_batch(8, 64, seed=2)
    controller = ExitController(config, target_compute=target)
    fractions = []
    with torch.no_grad():
        for step in range(150):
            state = discriminator(
                input_ids,
                attention_mask,
                token_type_ids,
                decision=ExitDecision.for_config(config, controller.threshold(step)),
            )
            fraction = sum(work.token_layers for work in state.work) / (state.exitable.sum() * 4)
            controller.update(float(fraction), step)
            fractions.append(float(fraction))
    settled = sum(fractions[-20:]) / 20
    assert abs(settled - target) <= 0.05, (settled, fractions[-20:])
    assert abs(fractions[0] - target) > 0.05  # it started away from the target


def test_controller_state_round_trips_and_warmup_disables_exits(tiny_config):
    controller = ExitController(tiny_config, target_compute=0.6, warmup_steps=10)
    assert controller.threshold(9) is None and controller.threshold(10) is not None
    controller.update(0.9, step=5)  # during warmup: no change
    assert controller.updates == 0
    controller.update(0.9, step=12)
    restored = ExitController(tiny_config, target_compute=0.6, warmup_steps=10)
    restored.load_state_dict(controller.state_dict())
    assert restored.threshold(20) == controller.threshold(20) < tiny_config.exit_threshold


def _discriminator_at_the_prior(exit_criterion):
    """Every head predicts the replacement rate for every token: bias at the prior's log-odds, zero weights."""
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset(
        "electra-tiny",
        vocab_size=VOCAB,
        exit_criterion=exit_criterion,
        head_bias_init="prior",
        exit_threshold=0.9,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ElectraPreTrainingModel(config)
    with torch.no_grad():
        for head in (model.discriminator.discriminator_predictions, *model.discriminator.exit_heads.values()):
            head.dense_prediction.weight.zero_()
    return config, model.discriminator.eval()


def _run_controller(config, discriminator, controller, updates: int) -> list[float]:
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, seed=3)
    fractions = []
    with torch.no_grad():
        for step in range(updates):
            state = discriminator(
                input_ids,
                attention_mask,
                token_type_ids,
                decision=ExitDecision.for_config(config, controller.threshold(step)),
            )
            exitable_token_layers = state.exitable.sum() * discriminator.num_layers
            fraction = float(sum(work.token_layers for work in state.work) / exitable_token_layers)
            controller.update(fraction, step)
            fractions.append(fraction)
    return fractions


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_heads_at_the_prior_keep_full_depth_for_any_target(target):
    config, discriminator = _discriminator_at_the_prior("prior_margin")
    controller = ExitController(config, target_compute=target, min_confidence=0.25)
    fractions = _run_controller(config, discriminator, controller, updates=40)
    assert fractions == [1.0] * 40
    assert controller.at_floor and controller.tau == pytest.approx(0.25)
    assert controller.updates == 40


@pytest.mark.parametrize("floor, expected_fraction", [(0.75, 1.0), (0.6, 1.0 / 4)])
def test_confidence_rule_at_the_prior_exits_only_below_the_floor(floor, expected_fraction):
    """Under `confidence` a head at the ~15% prior scores |2p - 1| = 0.7 on every token: a floor above
    0.7 keeps full depth; below it every token leaves at the first head (layer 1 of 4)."""
    config, discriminator = _discriminator_at_the_prior("confidence")
    controller = ExitController(config, target_compute=0.2, min_confidence=floor)
    fractions = _run_controller(config, discriminator, controller, updates=40)
    assert fractions[-1] == pytest.approx(expected_fraction)
    assert controller.tau == pytest.approx(floor)


def test_controller_clamps_tau_at_the_floor_from_below_only(tiny_config):
    controller = ExitController(tiny_config, target_compute=0.5, min_confidence=0.3)
    assert controller.tau == pytest.approx(tiny_config.exit_threshold) and not controller.at_floor
    controller.update(1.0, step=0)  # too much compute: logit(tau) falls by gain x 0.5 = 2
    assert controller.tau == pytest.approx(1 / (1 + math.exp(-(math.log(0.9 / 0.1) - 2.0))))
    for step in range(1, 10):
        controller.update(1.0, step)
    assert controller.tau == pytest.approx(0.3) and controller.at_floor
    controller.update(0.0, step=10)  # too little compute: tau rises off the floor at once, no wind-up
    assert controller.tau == pytest.approx(1 / (1 + math.exp(-(math.log(0.3 / 0.7) + 2.0))))
    assert not controller.at_floor
    unfloored = ExitController(tiny_config, target_compute=0.5, min_confidence=0.0)
    for step in range(20):
        unfloored.update(1.0, step)
    assert unfloored.tau < 0.001 and not unfloored.at_floor


def test_a_fixed_tau_below_the_floor_is_kept():
    """The floor bounds where the controller steers; without a target, tau is the user's exit_threshold."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_threshold=0.1)
    fixed = ExitController(config, target_compute=None, min_confidence=0.25)
    fixed.update(1.0, step=0)
    assert fixed.threshold(0) == pytest.approx(0.1) and not fixed.at_floor
    steered = ExitController(config, target_compute=0.5, min_confidence=0.25)
    assert steered.threshold(0) == pytest.approx(0.25) and steered.at_floor  # a steered start is raised


def test_controller_state_without_a_floor_loads_and_is_raised_to_it(tiny_config):
    old = {"threshold_logit": -6.0, "updates": 7, "last_compute_fraction": 0.9}  # saved before the floor existed
    controller = ExitController(tiny_config, target_compute=0.6, min_confidence=0.2)
    controller.load_state_dict(old)
    assert controller.updates == 7 and controller.tau == pytest.approx(0.2) and controller.at_floor
    assert controller.state_dict()["min_confidence"] == 0.2


def test_flop_counter_counts_rows_that_enter_the_matmuls(tiny_model):
    tiny_model.eval()
    rows_seen: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            rows_seen[name] = rows_seen.get(name, 0) + inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in tiny_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True)
    plan = torch.where(torch.rand(input_ids.shape) < 0.4, 1, torch.where(torch.rand(input_ids.shape) < 0.5, 2, 99))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math attention backend: torch's counter does not count the fused CPU attention kernel
    with FlopCounterMode(display=False) as counted, sdpa_kernel(SDPBackend.MATH):
        output = tiny_model(input_ids, attention_mask, token_type_ids, exit_plan=plan)
    for handle in handles:
        handle.remove()
    log = output.compute_log
    # The query, key and value projections run as one fused matmul (no module call to hook): the total
    # matmul and attention FLOPs torch counts must equal the counter's forward FLOPs.
    assert counted.get_total_flops() == output.flops.forward_flops
    for index, work in enumerate(log.discriminator):
        prefix = f"discriminator.electra.encoder.layer.{index}."
        assert rows_seen[prefix + "intermediate.dense"] == work.rows
        assert rows_seen[prefix + "output.dense"] == work.rows
        head = (
            "discriminator.discriminator_predictions.dense"
            if index == 3
            else f"discriminator.exit_heads.{index + 1}.dense"
        )
        assert rows_seen[head] == work.head_rows
    assert rows_seen["generator.generator_predictions.dense"] == log.generator_head_rows
    real = int(attention_mask.sum())
    # Layer 1 runs dense (padding included); after the exits only the active real tokens run.
    assert log.discriminator[0].rows == input_ids.numel()
    exited_after_one = int(((plan == 1) & attention_mask.bool()).sum())
    assert log.discriminator[1].rows == real - exited_after_one
    pinned = int((((input_ids == 101) | (input_ids == 102)) & attention_mask.bool()).sum())
    assert output.flops.token_layers_full == (real - pinned) * 4  # [CLS] and [SEP] are not counted
    assert output.flops.forward_flops < output.flops.forward_flops_full
    assert output.exit_layer_counts.sum() == real


def test_threshold_one_means_no_exit_and_zero_means_all_exit_at_first_head(tiny_model):
    input_ids, attention_mask, token_type_ids = make_batch(2, 16)
    assert tiny_model(input_ids, attention_mask, token_type_ids, exit_threshold=1.0).compute_fraction == 1.0
    everyone_out = tiny_model(input_ids, attention_mask, token_type_ids, exit_threshold=1e-9)
    assert everyone_out.exit_layer_counts[0] == attention_mask.sum()  # [CLS], [SEP] go with the last token
    assert everyone_out.compute_fraction == pytest.approx(0.25)  # counted over exitable tokens only


def _specials(input_ids):
    return (input_ids == 101) | (input_ids == 102)


def test_special_tokens_leave_with_their_sequences_last_exitable_token():
    """Pinned [CLS]/[SEP] never leave on their own confidence: each leaves after the layer its sequence's
    last exitable token left (sequences of one batch finishing at different layers), so a sequence
    whose tokens all exited has no active token."""
    model = _discriminator(seed=0)
    # a batch whose sequences finish at each of the 4 depths somewhere in the tau sweep below
    input_ids, attention_mask, token_type_ids = make_batch(4, 8, seed=8)
    specials, real = _specials(input_ids), attention_mask.bool()
    finishing_layers = set()
    for tau in torch.linspace(0.68, 0.71, 13).tolist():
        decision = ExitDecision.for_config(model.config, threshold=tau)
        with torch.no_grad():
            state = model(input_ids, attention_mask, token_type_ids, decision=decision)
        for row in range(input_ids.shape[0]):
            last_exitable = int(state.exit_layer[row][real[row] & ~specials[row]].max())
            assert (state.exit_layer[row][specials[row]] == last_exitable).all(), (tau, row)
            finishing_layers.add(last_exitable)
    assert finishing_layers == {1, 2, 3, 4}  # sequences finished at every depth, specials with them


def test_leaving_specials_carry_their_state_and_head_logit_and_change_no_other_token():
    """Against the rule where specials run every layer (reproduced by a forced plan: the exitable tokens'
    exit layers, specials never): every exitable token's logit is the same, and a special that left after
    layer L holds that run's state after layer L, with head_L's logit as its RTD output."""
    model = _discriminator(seed=0)
    input_ids, attention_mask, token_type_ids = make_batch(4, 8, seed=3)
    specials, real = _specials(input_ids), attention_mask.bool()
    decision = ExitDecision.for_config(model.config, threshold=0.6975)
    with torch.no_grad():
        state = model(input_ids, attention_mask, token_type_ids, decision=decision)
        pinned_plan = torch.where(specials, 99, state.exit_layer)
        reference = model.embed(input_ids, attention_mask, token_type_ids)
        states_after = {}
        for number in range(1, model.num_layers + 1):
            reference = model.run_layer(number, reference, ExitDecision(plan=pinned_plan))
            states_after[number] = reference.hidden.clone()
    assert (state.exit_layer[specials] < model.num_layers).any()  # some specials left early
    exitable = real & ~specials
    assert torch.allclose(state.logits[exitable], reference.logits[exitable], atol=1e-6)
    for row, column in specials.nonzero().tolist():
        layer = int(state.exit_layer[row, column])
        expected_state = states_after[layer][row, column]
        assert torch.allclose(state.hidden[row, column], expected_state, atol=1e-6)
        with torch.no_grad():
            expected_logit = model.head_for(layer)(expected_state[None]).float().squeeze()
        assert torch.allclose(state.logits[row, column], expected_logit, atol=1e-6)


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_a_sequence_whose_tokens_all_exited_has_no_active_token(exit_kv):
    model = _discriminator(exit_kv)
    input_ids, attention_mask, token_type_ids = make_batch(4, 32, pad_tail=True)
    state = model.embed(input_ids, attention_mask, token_type_ids)
    state = model.run_layer(1, state, ExitDecision.for_config(model.config, threshold=1e-9))
    assert not state.active.any()  # every exitable token left at the first head, specials with them
    assert (state.exit_layer[attention_mask.bool()] == 1).all()


def test_special_tokens_may_exit_when_allowed():
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, exit_special_tokens=True)
    model = ElectraPreTrainingModel(config)
    input_ids, attention_mask, token_type_ids = make_batch(2, 16)
    output = model(input_ids, attention_mask, token_type_ids, exit_threshold=1e-9)
    assert (output.exit_layer[attention_mask.bool()] == 1).all()


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_a_head_at_the_prior_never_exits_under_prior_margin_but_does_under_confidence(mask_prob):
    """A head that predicts the base rate for every token knows nothing: `prior_margin` gives it
    confidence 0 at any tau; `confidence` (|2p-1|) lets every token out once tau < |2 prior - 1|."""
    results = {}
    for criterion in ("prior_margin", "confidence"):
        config = ElectraExitConfig.from_preset(
            "electra-tiny", vocab_size=VOCAB, exit_criterion=criterion, mask_prob=mask_prob, head_bias_init="prior"
        )
        torch.manual_seed(0)
        model = ElectraPreTrainingModel(config)
        with torch.no_grad():
            for head in model.discriminator.exit_heads.values():
                head.dense_prediction.weight.zero_()  # the head outputs the prior's log-odds
        input_ids, attention_mask, token_type_ids = make_batch(4, 32)
        results[criterion] = [
            model(input_ids, attention_mask, token_type_ids, exit_threshold=tau).compute_fraction
            for tau in (1e-6, 0.1, 0.35)
        ]
    assert results["prior_margin"] == [1.0] * 3
    # |2p - 1| at the prior is 0.7 (mask_prob 0.15) or 0.4 (0.3): above every tau here.
    assert results["confidence"] == [pytest.approx(0.25)] * 3
