"""A run's configuration, from the command line to everything the run needs.

What lives where:
    train_config.py  TrainConfig: one dataclass per section, training presets, validation
    cli.py           command line -> TrainConfig, one flag per field (dsexit/commands/pretrain.py)
    ds_config.py     the DeepSpeed JSON: shipped configs by name, parallelism matrix, "auto" fields, precision
    ds_configs/      zero1/2/3.json, pipeline.json: package data (the repository's ds_configs/ links here)
    resolve.py       TrainConfig -> ResolvedRun: dataset, model config, DeepSpeed config, the
                     checkpoint to resume and the run-directory plan; before any process group

What the rest of dsexit uses is importable from here: `TrainConfig`, `ConfigError` (defined
with the other errors in dsexit/train/errors.py), `preset_config`, `TRAIN_PRESETS`, `PRECISIONS`.
"""

from dsexit.train.config.train_config import PRECISIONS, TRAIN_PRESETS, TrainConfig, preset_config
from dsexit.train.errors import ConfigError

__all__ = ["PRECISIONS", "TRAIN_PRESETS", "ConfigError", "TrainConfig", "preset_config"]
