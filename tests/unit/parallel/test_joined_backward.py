"""A pipeline stage's float outputs under DeepSpeed's one-`backward`-per-output loop: the stage's graph
is walked once, with every output's gradient, and the gradients equal one joint backward's. Also: the
project's own autograd functions pass no gradient on where none came in (as torch's ops), so a walk
that carries no gradient computes nothing."""

import torch
import torch.nn.functional as F

from dsexit.cpu import cpu_dropout
from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.pretraining import MaskedLMLoss
from dsexit.parallel.pipeline import (
    DiscriminatorLayerPipe,
    EmbedAndCorrupt,
    StageCounters,
    join_stage_gradients,
    micro_batch_inputs,
)


class _NoGradient(torch.autograd.Function):
    """Identity whose backward passes no gradient on."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, gradient):
        return None


def _stage_one(joined: bool):
    """Stage 1 of a 2-stage electra-tiny pipeline (embeddings, generator, layers 1-2 with exit heads),
    run on one micro-batch; returns (model, its float outputs, the gradient passes of layer 1's weight)."""
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=1000, min_exit_layer=1)
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config)
    layers = [EmbedAndCorrupt(model)] + [
        DiscriminatorLayerPipe(model.discriminator, number, StageCounters()) for number in (1, 2)
    ]
    layers[-1].joins_gradients = joined
    passes = []
    # (A tensor hook is also called, with None, where a backward pass reaches the weight without a gradient.)
    layers[1].layer.output.dense.weight.register_hook(lambda gradient: passes.append(gradient is not None))
    input_ids = torch.randint(200, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": input_ids * 0}
    outputs, _ = micro_batch_inputs(batch, config, None, None)
    torch.manual_seed(2)
    for layer in layers:
        outputs = layer(outputs)
    return model, [tensor for tensor in outputs if tensor.is_floating_point()], passes


def test_deepspeeds_per_output_backward_walks_the_stage_once_with_the_joint_gradients():
    reference, outputs, reference_passes = _stage_one(joined=False)
    gradients = [torch.randn(tensor.shape, generator=torch.Generator().manual_seed(3)) for tensor in outputs]
    torch.autograd.backward(outputs, gradients)  # one joint backward: the reference
    assert sum(reference_passes) == 1

    model, outputs, passes = _stage_one(joined=True)
    assert len(outputs) == 3  # hidden states, exit logits, losses
    for index, (tensor, gradient) in enumerate(zip(outputs, gradients)):  # as DeepSpeed's engine calls it
        tensor.backward(gradient=gradient, retain_graph=index < len(outputs) - 1)
    assert sum(passes) == 1, passes
    expected = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        if expected[name].grad is None:
            assert parameter.grad is None, name
        else:
            torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_stage_outputs_themselves_are_unchanged():
    outputs = (torch.randn(2, 3, requires_grad=True), torch.arange(4), torch.randn(2))
    joined = join_stage_gradients(outputs)
    assert all(torch.equal(a, b) for a, b in zip(outputs, joined))
    assert joined[1] is outputs[1]  # integer tensors pass through untouched


def test_dropout_and_the_masked_lm_loss_pass_no_gradient_on_where_none_came_in():
    torch.manual_seed(0)
    for ours, torchs in (
        (lambda x: cpu_dropout(x, 0.5, training=True), lambda x: F.dropout(x, 0.5, training=True)),
        (
            lambda x: MaskedLMLoss.apply(x, torch.tensor([1, 2]), torch.full((2,), 0.5))[0],
            lambda x: F.cross_entropy(x, torch.tensor([1, 2])),
        ),
    ):
        for function in (ours, torchs):
            inputs = torch.randn(2, 5, requires_grad=True)
            _NoGradient.apply(function(inputs)).sum().backward()
            assert inputs.grad is None
