"""From a validated `TrainConfig` to everything a run needs, before any process group exists.

Opens the dataset index (vocabulary, special tokens, sequence length), builds the model
config, derives the schedule length and the data-parallel layout, and resolves the
DeepSpeed JSON. Any user error surfaces here as one `ConfigError`. The result,
`ResolvedRun`, is what rank 0 prints once and what every checkpoint saves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from dsexit.data import DEFAULT_DATA_URL, DatasetFormatError, DatasetIndex
from dsexit.model import ElectraExitConfig
from dsexit.train.checkpoint import open_checkpoint
from dsexit.train.config import RESUME_KEYWORDS, ConfigError, TrainConfig
from dsexit.train.distributed import WorldInfo
from dsexit.train.ds_config import check_parallelism, load_ds_config, resolve_ds_config, zero_stage
from dsexit.train.redact import redact
from dsexit.train.store import is_remote

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = "config.json"


@dataclass
class ResolvedRun:
    config: TrainConfig
    world: WorldInfo
    dataset: DatasetIndex
    model_config: ElectraExitConfig
    ds_config: dict[str, Any]
    dp_size: int
    grad_accum: int
    total_steps: int
    precision: str
    threads: int

    @property
    def data_url(self) -> str:
        return self.config.data.url or DEFAULT_DATA_URL

    @property
    def run_dir(self) -> str:
        return self.config.job.run_dir

    @property
    def checkpoint_location(self) -> str:
        return self.config.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, credentials masked: printed once, saved with every checkpoint."""
        return redact({
            "train": self.config.to_dict(),
            "model": self.model_config.to_dict(),
            "deepspeed": self.ds_config,
            "derived": {
                "data_url": self.data_url, "seq_len": self.dataset.seq_len, "dataset_samples": self.dataset.num_samples,
                "world_size": self.world.world_size, "dp_size": self.dp_size, "grad_accum": self.grad_accum,
                "schedule_steps": self.total_steps, "precision": self.precision, "threads_per_rank": self.threads,
                "launcher": self.world.launcher, "checkpoint_location": self.checkpoint_location,
            },
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)


def _ds_config_path(path: str) -> str:
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)  # the default works from any working directory
    return in_repo if os.path.isfile(in_repo) else path


def _open_dataset(url: str) -> DatasetIndex:
    try:
        return DatasetIndex.load(url)
    except (FileNotFoundError, DatasetFormatError) as error:
        raise ConfigError(f"data={url!r} is invalid: {error}") from None


def dataset_model_fields(dataset: DatasetIndex, model_config: ElectraExitConfig | None = None) -> dict[str, Any]:
    special = dataset.special_tokens
    fields = dict(vocab_size=dataset.vocab_size, pad_token_id=special["pad"], cls_token_id=special["cls"],
                  sep_token_id=special["sep"], mask_token_id=special["mask"])
    if model_config is not None and model_config.max_position_embeddings < dataset.seq_len:
        fields["max_position_embeddings"] = dataset.seq_len
    return fields


def _check_resume(resume: str) -> None:
    if resume in RESUME_KEYWORDS:
        return
    if is_remote(resume):
        raise ConfigError(f"resume={resume!r} is invalid; a checkpoint in object storage is resumed with "
                          f"--checkpoint-dir URL --resume auto (it is downloaded to RUN_DIR/checkpoints).")
    try:
        open_checkpoint(resume)
    except FileNotFoundError as error:
        raise ConfigError(f"resume={resume!r} is invalid: {error}") from None


def resolve_run(config: TrainConfig, world: WorldInfo, threads: int) -> ResolvedRun:
    dataset = _open_dataset(config.data.url or DEFAULT_DATA_URL)
    provisional = config.model.build(dataset_model_fields(dataset))
    model_config = config.model.build(dataset_model_fields(dataset, provisional))
    stages = config.parallelism.pipeline_stages
    config.parallelism.deepspeed_config = _ds_config_path(config.parallelism.deepspeed_config)
    raw_ds_config = load_ds_config(config.parallelism.deepspeed_config)
    check_parallelism(raw_ds_config, stages, config.parallelism.deepspeed_config)
    if world.world_size % stages:
        raise ConfigError(f"pipeline_stages={stages} is invalid; expected a divisor of the world size {world.world_size}.")
    dp_size = world.world_size // stages
    total_steps = config.schedule_steps(dataset.seq_len)
    ds_config = resolve_ds_config(raw_ds_config, config, dp_size=dp_size,
                                  total_steps=total_steps, monitor_dir=os.path.join(config.job.run_dir, "monitor"))
    _check_resume(config.checkpoint.resume)
    if dataset.num_samples < config.training.global_batch_size:
        raise ConfigError(f"global_batch_size={config.training.global_batch_size} is invalid; the dataset "
                          f"{dataset.url} holds only {dataset.num_samples} samples.")
    return ResolvedRun(config=config, world=world, dataset=dataset, model_config=model_config, ds_config=ds_config,
                       dp_size=dp_size, grad_accum=ds_config["gradient_accumulation_steps"], total_steps=total_steps,
                       precision="bf16" if ds_config["bf16"]["enabled"] else "fp32", threads=threads)
