"""The one place that builds the model and its DeepSpeed engine.

Applies the optimizer parameter groups (`param_groups.py`: no weight decay on biases and
LayerNorm, as in ELECTRA) and owns the `universal_checkpoint_info` DeepSpeed saves with each checkpoint, which
`ds_to_universal` needs to convert it for a resume at another world size.
"""

from __future__ import annotations

from typing import Any

import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.train.param_groups import parameter_groups


def build_model(model_config: ElectraExitConfig, seed: int) -> ElectraPreTrainingModel:
    """Same initial weights on every rank: the init is seeded identically everywhere."""
    torch.manual_seed(seed)
    return ElectraPreTrainingModel(model_config)


def build_engine(
    model: ElectraPreTrainingModel,
    ds_config: dict[str, Any],
    pipeline_stages: int = 1,
    pipeline_partition: str = "type:DiscriminatorLayerPipe",
):
    """`deepspeed.initialize` with our parameter groups; returns the engine.

    With `pipeline_stages > 1` the model becomes a `PipelineModule` (each process keeps
    its stage's layers) and the engine a `PipelineEngine`.
    """
    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    if pipeline_stages > 1:
        from dsexit.parallel.pipeline import build_pipeline_module

        model = build_pipeline_module(model.config, pipeline_stages, partition_method=pipeline_partition, model=model)

    # DeepSpeed copies this module attribute into every checkpoint's model states.
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    weight_decay = ds_config["optimizer"]["params"].get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model.named_parameters(), weight_decay), config=ds_config
    )
    return engine
