"""The pipeline's layers map back to the plain model: a stage's weights, named as DeepSpeed names a
stage's layers (by global layer index), load into `ElectraPreTrainingModel` and give its outputs."""

import pytest
import torch
from torch import nn

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.parallel.pipeline import (
    DiscriminatorLayerPipe,
    EmbedAndCorrupt,
    StageCounters,
    local_layer_states,
    pipeline_state_dict_to_model,
)


def _pipeline_layers(model: ElectraPreTrainingModel) -> nn.Sequential:
    """The pipeline's layer sequence in one module: `nn.Sequential` names its layers "0", "1", ... as
    `PipelineModule` names a stage's layers by their global index."""
    counters = StageCounters()
    layers = [EmbedAndCorrupt(model)]
    layers += [
        DiscriminatorLayerPipe(model.discriminator, number, counters)
        for number in range(1, model.config.num_hidden_layers + 1)
    ]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("generator,embedding_size", [("mlm", 32), ("mlm", 64), ("unigram", 32)])
def test_stage_weights_rebuild_the_plain_model(generator, embedding_size):
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=1000, generator=generator, embedding_size=embedding_size
    )
    torch.manual_seed(0)
    trained = ElectraPreTrainingModel(config)
    if generator == "unigram":
        trained.set_unigram_counts(torch.arange(1000, dtype=torch.float64))
    layers = _pipeline_layers(trained)
    everything = local_layer_states(layers)
    # Two stages, each holding some layers: their union is the whole model.
    stages = [{i: s for i, s in everything.items() if i <= 2}, {i: s for i, s in everything.items() if i > 2}]
    merged = pipeline_state_dict_to_model({i: s for stage in stages for i, s in stage.items()}, config)
    torch.manual_seed(1)
    rebuilt = ElectraPreTrainingModel(config)
    rebuilt.load_state_dict(merged)  # strict: every name of the plain model, nothing else
    for name, tensor in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    input_ids = torch.randint(200, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0] = config.cls_token_id
    mask, types = torch.ones_like(input_ids), torch.zeros_like(input_ids)
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(
            trained.discriminator(input_ids, mask, types).logits, rebuilt.discriminator(input_ids, mask, types).logits
        )
