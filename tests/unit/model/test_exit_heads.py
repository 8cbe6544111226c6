"""The cheaper exit-head options: a linear head, heads every k-th layer, sampled deep supervision."""

import pytest
import torch

from dsexit.cpu import use_cpu_kernels
from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.flops import discriminator_layer_flops
from dsexit.model.layers import ElectraDiscriminatorPredictions, LinearExitHead

from .conftest import VOCAB, make_batch


def _model(**overrides) -> ElectraPreTrainingModel:
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset(
        "electra-tiny",
        vocab_size=VOCAB,
        num_hidden_layers=6,
        min_exit_layer=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **overrides,
    )
    return ElectraPreTrainingModel(config)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"exit_head": "mlp"}, "exit_head='mlp'"),
        ({"exit_interval": 0}, "exit_interval=0"),
        ({"exit_supervision": 0.0}, "exit_supervision=0.0"),
        ({"exit_supervision": 1.5}, "exit_supervision=1.5"),
    ],
)
def test_bad_head_options_name_the_value(overrides, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        ElectraExitConfig.from_preset("electra-tiny", **overrides)


def test_linear_heads_are_one_projection_and_the_final_head_stays_hf_shaped():
    model = _model(exit_head="linear")
    heads = model.discriminator.exit_heads
    assert all(isinstance(head, LinearExitHead) for head in heads.values())
    assert isinstance(model.discriminator.discriminator_predictions, ElectraDiscriminatorPredictions)
    hidden = model.config.hidden_size
    assert sum(p.numel() for p in heads.parameters()) == len(heads) * (hidden + 1)
    plan = torch.where(torch.rand(make_batch(4, 32)[0].shape, generator=torch.Generator().manual_seed(1)) < 0.5, 2, 99)
    output = model(*make_batch(4, 32), exit_plan=plan)
    output.loss.backward()
    for name, parameter in heads.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # the FLOP counter prices a linear head at one H->1 projection per row
    dense_model = _model()
    dense_output = dense_model(*make_batch(4, 32), exit_plan=plan)
    assert output.flops.forward_flops < dense_output.flops.forward_flops

    def discriminator_flops(run, config):  # the generator's work follows each run's own masking
        return sum(discriminator_layer_flops(work, config) for work in run.compute_log.discriminator)

    saved = discriminator_flops(dense_output, dense_model.config) - discriminator_flops(output, model.config)
    head_rows = sum(work.head_rows for work in output.compute_log.discriminator[:-1])
    assert saved == 2 * head_rows * hidden * hidden


def test_heads_every_second_layer_and_tokens_exit_only_where_a_head_is():
    model = _model(exit_interval=2).eval()
    assert model.config.exit_layers == [1, 3, 5]
    assert sorted(int(number) for number in model.discriminator.exit_heads) == [1, 3, 5]
    input_ids, attention_mask, token_type_ids = make_batch(4, 32)
    planned = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    plan = torch.where(planned, 2, 99)  # planned after layer 2, which has no head: they leave at layer 3
    with torch.no_grad():
        output = model(input_ids, attention_mask, token_type_ids, exit_plan=plan)
    real = attention_mask.bool()
    assert set(output.exit_layer[real & planned].tolist()) == {3}
    assert set(output.exit_layer[real & ~planned].tolist()) == {6}
    assert [work.head_rows > 0 for work in output.compute_log.discriminator] == [True, False, True, False, True, True]


def test_sampled_supervision_trains_the_heads_on_a_share_and_counts_less_backward():
    torch.manual_seed(3)
    model = _model(exit_supervision=0.25)
    input_ids, attention_mask, token_type_ids = make_batch(8, 64)
    output = model(input_ids, attention_mask, token_type_ids, exit_threshold=0.99)
    output.loss.backward()
    for name, parameter in model.discriminator.exit_heads.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    works = output.compute_log.discriminator[:-1]
    rows = sum(work.head_rows for work in works)
    graph_rows = sum(work.head_graph_rows for work in works)
    assert 0.1 * rows < graph_rows < 0.45 * rows  # about a quarter, plus the exiting rows
    flops = output.flops
    assert flops.training_flops < 3 * flops.forward_flops
    full = _model()(input_ids, attention_mask, token_type_ids, exit_threshold=0.99).flops
    assert full.training_flops == 3 * full.forward_flops  # everything with autograd: backward = 2 x forward


def test_sampled_supervision_leaves_the_outputs_of_exiting_tokens_as_they_were():
    """Exiting tokens take their head's logit (with its gradient) whatever the sample."""
    sampled, everyone = _model(exit_supervision=0.1), _model()
    everyone.load_state_dict(sampled.state_dict())
    input_ids, attention_mask, token_type_ids = make_batch(4, 32)
    plan = torch.where(torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(2)) < 0.6, 1, 99)
    torch.manual_seed(5)
    ours = sampled(input_ids, attention_mask, token_type_ids, exit_plan=plan)
    torch.manual_seed(5)
    reference = everyone(input_ids, attention_mask, token_type_ids, exit_plan=plan)
    assert torch.equal(ours.exit_layer, reference.exit_layer)
    assert torch.allclose(ours.discriminator_logits, reference.discriminator_logits, atol=1e-6)
    real = attention_mask.bool()  # the final RTD loss alone: the head is in it through the exited tokens
    torch.nn.functional.binary_cross_entropy_with_logits(
        ours.discriminator_logits[real], ours.rtd_labels[real]
    ).backward()
    assert sampled.discriminator.exit_heads["1"].dense_prediction.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("generator", ["mlm", "uniform"])
@pytest.mark.parametrize("exit_head", ["dense", "linear"])
def test_a_model_with_exits_starts_from_the_weights_of_one_without(generator, exit_head):
    """Arms of one seed in bench/pretrain_vs_exit differ only by their exits: every parameter the
    no-exit model has is equal, bit for bit, in the model with exit heads under the same seed."""
    without_exits = _model(exit_enabled=False, generator=generator).state_dict()
    with_exits = _model(exit_enabled=True, generator=generator, exit_head=exit_head)
    shared = {name: value for name, value in with_exits.state_dict().items() if ".exit_heads." not in name}
    assert shared.keys() == without_exits.keys()
    assert all(torch.equal(shared[name], without_exits[name]) for name in shared)
    # The heads themselves still get ELECTRA's normal(0, initializer_range) weights, drawn last.
    head_weights = torch.cat(
        [p.flatten() for name, p in with_exits.discriminator.exit_heads.named_parameters() if name.endswith("weight")]
    )
    initializer_range = with_exits.config.initializer_range
    assert head_weights.std().item() == pytest.approx(initializer_range, rel=0.1)
    assert abs(head_weights.mean().item()) < initializer_range / 10


@pytest.mark.parametrize("threshold", [0.3, 0.7])  # every token out at layer 1; some layers emptied
@pytest.mark.parametrize("generator", ["mlm", "uniform"])
def test_exits_draw_the_same_random_numbers_as_no_exit_with_the_cpu_kernels(generator, threshold):
    """Masks, replacements and dropout come from one stream; with the CPU kernels the trainer uses on
    a CPU host (`dsexit.cpu.use_cpu_kernels`), each dropout call takes one draw whatever its size, even
    on a layer every token has left, so a run whose tokens exit stays on the no-exit run's stream: the
    arms of a seed see the same masked positions at every step."""
    input_ids, attention_mask, token_type_ids = make_batch(batch_size=8, seq_len=32)
    states = []
    use_cpu_kernels()
    try:
        for exit_enabled, exit_threshold in ((False, None), (True, threshold)):
            torch.manual_seed(0)
            config = ElectraExitConfig.from_preset(
                "electra-tiny",
                vocab_size=VOCAB,
                num_hidden_layers=6,
                min_exit_layer=1,
                generator=generator,
                exit_enabled=exit_enabled,
            )
            model = ElectraPreTrainingModel(config).train()
            torch.manual_seed(1)
            for _ in range(3):
                output = model(input_ids, attention_mask, token_type_ids, exit_threshold=exit_threshold)
                output.loss.backward()
            if exit_enabled:
                assert output.compute_fraction < 0.9  # tokens did exit
            states.append(torch.get_rng_state())
    finally:
        use_cpu_kernels(False)
    assert torch.equal(states[0], states[1])
