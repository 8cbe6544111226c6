"""The CPU kernels (`dsexit.cpu`): dropout with torch's semantics (drop rate, scaling, gradient,
seeding) and a cheaper mask, and attention in training computing what SDPA's math path computes
with that mask; and the door itself: the model uses torch's kernels until a CPU set-up fills the slots."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsexit.cpu import cpu_dropout as dropout
from dsexit.cpu import use_cpu_kernels
from dsexit.model import ElectraExitConfig, kernels
from dsexit.model.layers import Dropout, ElectraSelfAttention, EncoderShape


@pytest.fixture
def tiny_config():
    return ElectraExitConfig.from_preset("electra-tiny", vocab_size=1000)


@pytest.fixture
def with_cpu_kernels():
    use_cpu_kernels()
    yield
    use_cpu_kernels(False)


def test_the_model_uses_torchs_kernels_until_a_cpu_set_up_fills_the_slots():
    assert kernels.uses_defaults()
    use_cpu_kernels()
    try:
        assert kernels.active.dropout is dropout and not kernels.uses_defaults()
    finally:
        use_cpu_kernels(False)
    assert kernels.uses_defaults()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_the_configured_fraction_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    inputs = torch.rand(1_000_000) + 0.5
    outputs = dropout(inputs, p, training=True)
    dropped = (outputs == 0).double().mean().item()
    # binomial standard deviation at n = 1e6 is below 5e-4; p itself is rounded to a multiple of 2^-16
    assert abs(dropped - p) < 3e-3, dropped
    kept = outputs != 0
    scale = (outputs[kept] / inputs[kept]).unique()
    assert torch.allclose(scale, torch.tensor(1.0 / (1.0 - p)), rtol=1e-4), scale
    assert abs(outputs.mean().item() / inputs.mean().item() - 1.0) < 5e-3


def test_every_draw_is_used_alike_across_positions():
    """The four 16-bit values of a 64-bit draw each decide one element: no position is favoured."""
    torch.manual_seed(1)
    outputs = dropout(torch.ones(400_000, 4), 0.25, training=True)
    per_lane = (outputs == 0).double().mean(0)
    assert (per_lane - 0.25).abs().max() < 5e-3, per_lane


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    inputs = torch.randn(64, 32, requires_grad=True)
    outputs = dropout(inputs, 0.3, training=True)
    upstream = torch.randn_like(outputs)
    outputs.backward(upstream)
    kept = (outputs != 0).float()
    scale = 1.0 / (1.0 - round(0.3 * 65536) / 65536)
    assert torch.allclose(inputs.grad, upstream * kept * scale)


def test_seeded_like_torch_and_off_outside_training():
    inputs = torch.randn(8, 100)
    torch.manual_seed(3)
    first = dropout(inputs, 0.1, training=True)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(inputs, 0.1, training=True))
    assert dropout(inputs, 0.1, training=False) is inputs
    assert dropout(inputs, 0.0, training=True) is inputs
    assert dropout(torch.empty(0, 4), 0.1, training=True).shape == (0, 4)  # no rows active at a layer
    module = Dropout(0.1).eval()
    assert module(inputs) is inputs and module.p == 0.1


def test_the_mask_follows_the_generator_state_a_checkpoint_saves():
    inputs = torch.randn(50, 70)
    torch.manual_seed(5)
    dropout(inputs, 0.1, training=True)
    state = torch.get_rng_state()
    first = dropout(inputs, 0.1, training=True)
    torch.set_rng_state(state)
    assert torch.equal(first, dropout(inputs, 0.1, training=True))
    assert not torch.equal(first, dropout(inputs, 0.1, training=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_the_input_times_the_scale_rounded_once(dtype):
    """The scale is 1 / 0.899994 in fp32, as torch's own dropout multiplies by. In bf16 it is not
    folded into the mask: a bf16 mask would round it and shrink every kept element by 0.16%."""
    torch.manual_seed(6)
    inputs = (torch.rand(100_000) + 0.5).to(dtype).requires_grad_()
    outputs = dropout(inputs, 0.1, training=True)
    assert outputs.dtype == dtype
    scale = torch.tensor(65536 / (65536 - round(0.1 * 65536)))
    kept = outputs != 0
    expected = (inputs.detach()[kept].float() * scale).to(dtype)
    assert torch.equal(outputs[kept], expected)
    outputs.backward(torch.ones_like(outputs))
    assert torch.equal(inputs.grad[kept], torch.full_like(expected, scale.item())) and not inputs.grad[~kept].any()


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_in_training_is_the_math_path_with_the_same_mask(with_mask, tiny_config, with_cpu_kernels):
    shape = EncoderShape.discriminator(tiny_config)
    attention = ElectraSelfAttention(shape, tiny_config).train()
    hidden = torch.randn(3, 10, shape.hidden_size)
    key_mask = None
    if with_mask:
        key_mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
        key_mask[1, ..., 7:] = False
    query, key, value = attention.query(hidden), attention.key(hidden), attention.value(hidden)
    torch.manual_seed(4)
    context = attention._attend(query, key, value, key_mask)

    def heads(x):
        return x.view(3, 10, shape.num_heads, -1).transpose(1, 2)

    scores = heads(query) @ heads(key).transpose(-1, -2) / math.sqrt(shape.hidden_size // shape.num_heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    torch.manual_seed(4)  # the same draws: the mask is the attention's only use of the generator
    probs = dropout(F.softmax(scores, dim=-1), tiny_config.attention_probs_dropout_prob, training=True)
    expected = (probs @ heads(value)).transpose(1, 2).reshape(3, 10, shape.hidden_size)
    assert torch.allclose(context, expected, atol=1e-6)
    attention.eval()
    assert torch.allclose(
        attention._attend(query, key, value, key_mask),
        (F.softmax(scores, -1) @ heads(value)).transpose(1, 2).reshape(3, 10, -1),
        atol=1e-6,
    )
