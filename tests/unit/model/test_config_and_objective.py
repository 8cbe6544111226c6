"""Configuration errors, masking and the generator study's replacement modes."""

import math

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel

from .conftest import VOCAB, make_batch


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(exit_threshold=0.0), "exit_threshold=0.0"),
        (dict(exit_threshold=1.5), "exit_threshold=1.5"),
        (dict(min_exit_layer=4), "min_exit_layer=4"),
        (dict(min_exit_layer=0), "min_exit_layer=0"),
        (dict(generator="bert"), "generator='bert'"),
        (dict(hidden_size=65), "hidden_size=65"),
        (dict(exit_kv="maybe"), "exit_kv='maybe'"),
        (dict(mask_token_id=VOCAB), f"mask_token_id={VOCAB}"),
        (dict(head_bias_init="random"), "head_bias_init='random'"),
        (dict(exit_criterion="entropy"), "exit_criterion='entropy'"),
        (dict(aux_weight=-0.1), "aux_weight=-0.1"),
    ],
)
def test_bad_values_raise_one_clear_error_naming_the_value(overrides, named):
    with pytest.raises(ValueError) as error:
        ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, **overrides)
    message = str(error.value)
    assert named in message and "expected" in message
    assert message.count("\n") == 0


def test_unknown_preset_and_field_are_rejected():
    with pytest.raises(ValueError, match="electra-huge"):
        ElectraExitConfig.from_preset("electra-huge")
    with pytest.raises(ValueError, match="hiden_size"):
        ElectraExitConfig.from_preset("electra-tiny", hiden_size=3)


def test_training_settings_left_the_model_config_and_old_saved_configs_still_load():
    with pytest.raises(ValueError, match="exit_control.target_compute"):
        ElectraExitConfig.from_preset("electra-tiny", target_compute=0.6)
    saved = {
        **ElectraExitConfig.from_preset("electra-tiny").to_dict(),
        "extra": {},
        "target_compute": 0.7,
        "controller_gain": 4.0,
        "exit_warmup_steps": 200,
    }  # as runs before the move stored it
    assert ElectraExitConfig.from_saved(saved) == ElectraExitConfig.from_preset("electra-tiny")
    with pytest.raises(ValueError, match="hiden_size"):
        ElectraExitConfig.from_saved({**saved, "hiden_size": 3})


def test_presets_have_the_documented_sizes():
    small = ElectraExitConfig.from_preset("electra-small")
    assert (
        small.num_hidden_layers,
        small.hidden_size,
        small.embedding_size,
        small.num_attention_heads,
        small.intermediate_size,
        small.generator_hidden_size,
    ) == (12, 256, 128, 4, 1024, 64)
    base = ElectraExitConfig.from_preset("electra-base")
    assert (base.hidden_size, base.num_hidden_layers) == (768, 12)
    assert ElectraExitConfig.from_dict(small.to_dict()) == small


def test_masking_picks_an_exact_count_of_real_non_special_tokens_per_sequence(tiny_model):
    """google-research/electra's rule: min(slots, max(1, round(0.15 x candidates))) per sequence, in a
    fixed [batch, slots] layout with slots = int(0.155 x T); slots past the count are not masked."""
    torch.manual_seed(0)
    input_ids, attention_mask, _ = make_batch(64, 64, pad_tail=True)
    input_ids[3, 1:] = 0  # a sequence of one real token past [CLS]...
    attention_mask[3, 2:] = 0
    input_ids[4, :] = 102  # ...and one with no candidate at all
    slots = tiny_model.choose_masked_positions(input_ids, attention_mask)
    assert slots.positions.shape == slots.valid.shape == (64, int(0.155 * 64))
    chosen = torch.zeros(input_ids.numel(), dtype=torch.bool)
    chosen[slots.flat(64)[slots.valid.reshape(-1)]] = True
    chosen = chosen.view_as(input_ids)
    candidates = attention_mask.bool() & (input_ids != 101) & (input_ids != 102) & (input_ids != 0)
    assert not (chosen & ~candidates).any()
    for row in range(64):
        available = int(candidates[row].sum())
        expected = min(available, min(int(0.155 * 64), max(1, round(0.15 * available))))
        assert int(chosen[row].sum()) == int(slots.valid[row].sum()) == expected, row
    assert int(chosen[4].sum()) == 0
    # every slot of a sequence names a distinct position (unmasked slots write back their token)
    assert all(len(set(slots.positions[row].tolist())) == slots.positions.shape[1] for row in range(64))
    # a different draw picks different positions
    again = tiny_model.choose_masked_positions(input_ids, attention_mask)
    assert not torch.equal(again.positions, slots.positions)


def test_loss_combines_generator_and_weighted_discriminator(tiny_model):
    input_ids, attention_mask, token_type_ids = make_batch(4, 32)
    output = tiny_model(input_ids, attention_mask, token_type_ids)
    share = tiny_model.config.aux_weight
    expected = output.generator_loss + 50 * ((1 - share) * output.discriminator_loss + share * output.aux_loss)
    assert torch.allclose(output.loss, expected)
    # Replaced tokens are labelled 1; a sampled token equal to the original is labelled 0.
    assert output.rtd_labels.sum() > 0


def test_generator_share_of_the_loss_is_the_same_with_and_without_exits():
    """Exit heads take a share of the discriminator term: on a batch where every head has the
    same RTD loss, the loss with exit heads equals the loss without them (the generator's loss,
    zero here, is then the same share of both)."""
    losses = {}
    for exit_enabled in (True, False):
        config = ElectraExitConfig.from_preset(
            "electra-tiny",
            vocab_size=VOCAB,
            exit_enabled=exit_enabled,
            aux_weight=0.3,
            head_bias_init="prior",
            generator="uniform",
        )
        torch.manual_seed(0)
        model = ElectraPreTrainingModel(config)
        with torch.no_grad():  # every RTD head outputs its bias alone: equal losses at every depth
            for head in (model.discriminator.discriminator_predictions, *model.discriminator.exit_heads.values()):
                head.dense_prediction.weight.zero_()
        input_ids, attention_mask, token_type_ids = make_batch(4, 32)
        torch.manual_seed(1)
        output = model(input_ids, attention_mask, token_type_ids)
        assert torch.allclose(output.aux_loss, output.discriminator_loss) or not exit_enabled
        losses[exit_enabled] = float(output.loss.detach())
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    with pytest.raises(ValueError, match="aux_weight=1.0"):
        ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, aux_weight=1.0)


@pytest.mark.parametrize("mode", ["uniform", "unigram"])
def test_generator_free_modes_draw_replacements_without_a_generator(mode):
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB, generator=mode)
    model = ElectraPreTrainingModel(config)
    assert model.generator is None
    if mode == "unigram":
        counts = torch.zeros(VOCAB)
        counts[[500, 501]] = torch.tensor([3.0, 1.0])
        counts[101] = 1000.0  # a special token is never drawn, however frequent
        model.set_unigram_counts(counts)
    input_ids, attention_mask, token_type_ids = make_batch(32, 64)
    torch.manual_seed(1)
    masked = int(model.choose_masked_positions(input_ids, attention_mask).valid.sum())
    torch.manual_seed(1)
    output = model(input_ids, attention_mask, token_type_ids)
    replaced = output.rtd_labels.reshape(-1).bool()
    assert output.generator_loss == 0
    assert replaced.sum() > 0.9 * masked  # almost every masked token gets a different one
    if mode == "unigram":
        # Labels mark replacements; with only ids 500/501 drawable, the share of 500 is ~3/4.
        drawn = torch.multinomial(model.replacement_probs, 20000, replacement=True)
        assert set(drawn.unique().tolist()) == {500, 501}
        assert abs(float((drawn == 500).float().mean()) - 0.75) < 0.02
    else:
        assert model.replacement_probs[[0, 101, 102, 103]].sum() == 0


@pytest.mark.parametrize("head_bias_init", ["prior", "zero"])
def test_rtd_heads_start_at_the_replacement_prior_or_at_zero(head_bias_init):
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=VOCAB, mask_prob=0.2, head_bias_init=head_bias_init
    )
    model = ElectraPreTrainingModel(config)
    heads = [model.discriminator.discriminator_predictions, *model.discriminator.exit_heads.values()]
    assert len(heads) == config.num_hidden_layers - config.min_exit_layer + 1
    expected = math.log(0.2 / 0.8) if head_bias_init == "prior" else 0.0
    for head in heads:
        assert head.dense_prediction.bias.item() == pytest.approx(expected, abs=1e-6)
    # Only the output bias moves: the hidden layer of each head keeps HF's zero bias.
    assert all(head.dense.bias.detach().abs().max().item() == 0.0 for head in heads)
    # An untrained discriminator then predicts about the replacement rate on average.
    model.eval()
    input_ids, attention_mask, token_type_ids = make_batch(batch_size=4, seq_len=24)
    with torch.no_grad():
        probability = torch.sigmoid(model.discriminator(input_ids, attention_mask, token_type_ids).logits)
    assert float(probability[attention_mask.bool()].mean()) == pytest.approx(
        0.2 if head_bias_init == "prior" else 0.5, abs=0.08
    )
