"""With exits off, our discriminator and generator equal Hugging Face's ELECTRA."""

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.hf import to_hf_masked_lm, to_hf_pretraining
from dsexit.model.pretraining import MaskedSlots

from .conftest import VOCAB, make_batch


def _models(preset: str, **overrides):
    torch.manual_seed(1)
    config = ElectraExitConfig.from_preset(preset, vocab_size=VOCAB, **overrides)
    model = ElectraPreTrainingModel(config).eval()
    # Non-trivial biases and LayerNorms, so a mis-mapped parameter cannot hide behind init values.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model, to_hf_pretraining(model), to_hf_masked_lm(model)


@pytest.mark.parametrize("preset", ["electra-tiny", "electra-small"])
@pytest.mark.parametrize("padded", [False, True], ids=["random", "padded"])
def test_discriminator_and_generator_match_hf(preset, padded):
    model, hf_discriminator, hf_generator = _models(preset)
    input_ids, attention_mask, token_type_ids = make_batch(4, 48, pad_tail=padded, seed=3)
    if padded:
        assert (attention_mask == 0).any()
    with torch.no_grad():
        ours = model.discriminator(input_ids, attention_mask, token_type_ids).logits
        theirs = hf_discriminator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        ours_generator = model.generator(model.embeddings, input_ids, attention_mask, token_type_ids)
        theirs_generator = hf_generator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours_generator.shape == theirs_generator.shape
    assert (ours_generator - theirs_generator).abs().max() <= 1e-5


@pytest.mark.parametrize("padded", [False, True], ids=["random", "padded"])
def test_generator_on_selected_rows_equals_hf_at_those_rows(padded):
    """Pre-training asks the generator for the masked rows only; its last layer then computes just
    those. The logits equal HF's at the same positions."""
    model, _, hf_generator = _models("electra-small")
    input_ids, attention_mask, token_type_ids = make_batch(4, 48, pad_tail=padded, seed=5)
    masked = (torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(6)) < 0.15) & attention_mask.bool()
    slots = MaskedSlots.from_mask(masked)  # a [batch, slots] layout, as pre-training asks for
    with torch.no_grad():
        ours = model.generator(model.embeddings, input_ids, attention_mask, token_type_ids, positions=slots.positions)
        theirs = hf_generator(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    theirs = theirs.reshape(-1, theirs.shape[-1]).index_select(0, slots.flat(input_ids.shape[1]))
    assert 0 < int(slots.valid.sum()) < input_ids.numel() / 4
    assert not slots.valid.all()  # slots past a sequence's count too: the layer computes them alike
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5


def test_exit_model_without_exits_equals_hf():
    """Exit heads present and trained, but no token exits: logits still equal HF's."""
    model, hf_discriminator, _ = _models("electra-tiny", exit_enabled=True, min_exit_layer=1)
    assert len(model.discriminator.exit_heads) == 3
    input_ids, attention_mask, token_type_ids = make_batch(3, 40, pad_tail=True, seed=4)
    labels = torch.zeros(input_ids.shape)
    with torch.no_grad():
        state = model.discriminator(input_ids, attention_mask, token_type_ids, labels=labels)
        theirs = hf_discriminator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
    assert (state.logits - theirs).abs().max() <= 1e-5
    assert state.aux_loss > 0  # the heads were still supervised


def test_parameter_names_map_by_prefix_only():
    model, hf_discriminator, hf_generator = _models("electra-tiny")
    ours = set(model.state_dict())
    for name in hf_discriminator.state_dict():
        assert "discriminator." + name in ours
    for name in hf_generator.state_dict():
        if name.startswith("electra.embeddings."):
            assert "discriminator." + name in ours
        elif name != "generator_lm_head.weight":
            assert "generator." + name in ours, name
