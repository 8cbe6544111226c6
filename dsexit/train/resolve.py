"""From a validated `TrainConfig` to everything a run needs, before any process group exists.

Opens the dataset index (vocabulary, special tokens, sequence length), builds the model
config, derives the schedule length and the data-parallel layout, and resolves the
DeepSpeed JSON. Then the checkpoint side: every location the run will write is probed
(a small object written and removed), the checkpoint `--resume` selects is read (its
marker only) and must fit this model and seed, and the run-directory plan is made (a new
run, a continuation, a rollback or a fork; see rundir.py). Any user error surfaces here
as one `ConfigError`, credentials in URLs masked. The result, `ResolvedRun`, is what
rank 0 prints once and what every checkpoint saves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from dsexit.data import DEFAULT_DATA_URL, DatasetFormatError, DatasetIndex
from dsexit.data.storage import RetryPolicy
from dsexit.model import ElectraExitConfig
from dsexit.parallel.partition import PartitionError, is_layer_partition, parse_layer_counts
from dsexit.train.checkpoint import CheckpointError, CheckpointRef, open_checkpoint, resume_choice, saved_model_config
from dsexit.train.config import RESUME_KEYWORDS, ConfigError, TrainConfig
from dsexit.train.distributed import WorldInfo
from dsexit.train.ds_config import check_parallelism, find_ds_config, load_ds_config, resolve_ds_config, zero_stage
from dsexit.train.host_allocator import allocator_in_use
from dsexit.train.redact import redact, redact_text
from dsexit.train.rundir import RunDirError, RunPlan, plan_run
from dsexit.train.store import RemoteMirror, StorageError, is_remote, local_path, probe_local_dir

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
    run_plan: RunPlan | None = None
    """What this start is (new run, continuation, rollback, fork); None when not planned."""

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
    def checkpoint_root(self) -> str:
        """Where DeepSpeed writes checkpoints: the location, or the local staging copy of a URL."""
        location = self.checkpoint_location
        return os.path.join(self.run_dir, "checkpoints") if is_remote(location) else local_path(location)

    def retry_policy(self) -> RetryPolicy:
        """The data reader's policy, for every object-store operation of checkpoints."""
        return RetryPolicy(self.config.checkpoint.retries)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, credentials masked: printed once, saved with every checkpoint."""
        train = self.config.to_dict()
        train["checkpoint"].pop("start_over")  # a one-off action: a saved config must not repeat it
        return redact(
            {
                "train": train,
                "model": self.model_config.to_dict(),
                "deepspeed": self.ds_config,
                "derived": {
                    "data_url": self.data_url,
                    "seq_len": self.dataset.seq_len,
                    "dataset_samples": self.dataset.num_samples,
                    "world_size": self.world.world_size,
                    "dp_size": self.dp_size,
                    "grad_accum": self.grad_accum,
                    "schedule_steps": self.total_steps,
                    "precision": self.precision,
                    "threads_per_rank": self.threads,
                    "host_allocator": allocator_in_use(),
                    "launcher": self.world.launcher,
                    "checkpoint_location": self.checkpoint_location,
                },
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)


def _open_dataset(url: str) -> DatasetIndex:
    try:
        return DatasetIndex.load(url)
    except (FileNotFoundError, DatasetFormatError) as error:
        raise ConfigError(f"data={url!r} is invalid: {error}") from None


def dataset_model_fields(dataset: DatasetIndex) -> dict[str, Any]:
    """The model fields a dataset owns (`dsexit.model.config.DATASET_FIELDS`)."""
    special = dataset.special_tokens
    return dict(
        vocab_size=dataset.vocab_size,
        pad_token_id=special["pad"],
        cls_token_id=special["cls"],
        sep_token_id=special["sep"],
        mask_token_id=special["mask"],
    )


def _check_resume_value(resume: str) -> None:
    if resume not in RESUME_KEYWORDS and is_remote(resume):
        raise ConfigError(
            f"resume={resume!r} is invalid; a checkpoint in object storage is resumed with "
            f"--checkpoint-dir URL --resume auto (it is downloaded to RUN_DIR/checkpoints)."
        )


def _model_shapes(model_config: ElectraExitConfig) -> dict[str, tuple[int, ...]]:
    import torch

    from dsexit.model import ElectraPreTrainingModel

    with torch.device("meta"):  # shapes only: no memory, no init
        model = ElectraPreTrainingModel(model_config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_fits(ref: CheckpointRef, model_config: ElectraExitConfig, seed: int) -> None:
    """The checkpoint was saved by a model of this shape and a run of this seed (its marker says)."""
    saved_config = saved_model_config(ref.meta)
    if saved_config is not None:
        saved = ElectraExitConfig.from_saved(saved_config)
        if _model_shapes(saved) != _model_shapes(model_config):
            then, now = saved.to_dict(), model_config.to_dict()
            differ = [name for name in then if now.get(name) != then[name]][:6]
            raise ConfigError(
                f"checkpoint {ref.path} holds a model of another shape: saved with "
                f"{', '.join(f'{name}={then[name]!r}' for name in differ)}, this run has "
                f"{', '.join(f'{name}={now.get(name)!r}' for name in differ)}; resume with the model it was saved "
                f"with, or start a new run in another --run-dir."
            )
    saved_seed = ((ref.meta.get("config") or {}).get("train") or {}).get("job", {}).get("seed")
    if saved_seed is not None and saved_seed != seed:
        raise ConfigError(
            f"seed={seed} is invalid; checkpoint {ref.path} was saved by a run with seed={saved_seed}, "
            f"which fixes its data order and masking; resume with --seed {saved_seed}."
        )


def _probe_locations(run: "ResolvedRun", mirror: RemoteMirror | None) -> None:
    """Write and remove a small object in every location the run will write, before step 1. Local
    directories are probed once per node (local rank 0): a node's other ranks would race it, each
    removing the directories its probe created while another creates or uses them."""
    if run.world.local_rank == 0:
        probe_local_dir(run.run_dir, "run_dir")
        probe_local_dir(
            run.checkpoint_root,
            "checkpoint_dir" if not mirror and run.config.checkpoint.dir else "the checkpoint staging directory",
        )
    if mirror is not None:
        mirror.probe()


def _chosen_checkpoint(resume: str, root: str, mirror: RemoteMirror | None) -> CheckpointRef | None:
    """The checkpoint `--resume` selects, by its marker (as the trainer will choose it); nothing
    is downloaded."""
    if resume == "none":
        return None
    if resume != "auto":
        try:
            return open_checkpoint(resume)
        except (FileNotFoundError, CheckpointError) as error:
            raise ConfigError(f"resume={resume!r} is invalid: {error}") from None
    local = resume_choice(root)
    remote = mirror.choice() if mirror is not None else None
    return remote if remote is not None and (local is None or remote.step > local.step) else local


def plan_checkpoints(run: "ResolvedRun") -> RunPlan:
    """Probe, choose, check the fit, and plan the run directory; ConfigError on any user error."""
    from dsexit.train.checkpoint import RemoteCheckpoints

    ckpt = run.config.checkpoint
    try:
        mirror = (
            RemoteCheckpoints(run.checkpoint_location, run.retry_policy())
            if is_remote(run.checkpoint_location)
            else None
        )
        _probe_locations(run, mirror.remote if mirror else None)
        chosen = _chosen_checkpoint(ckpt.resume, run.checkpoint_root, mirror)
        if chosen is not None:
            check_fits(chosen, run.model_config, run.config.job.seed)
        return plan_run(
            run_dir=run.run_dir,
            checkpoint_root=run.checkpoint_root,
            resume=ckpt.resume,
            start_over=ckpt.start_over,
            chosen=chosen,
            remote_steps=mirror.steps() if mirror else [],
            remote_shown=mirror.remote.shown if mirror else None,
        )
    except ConfigError:
        raise
    except (StorageError, RunDirError, CheckpointError) as error:
        raise ConfigError(str(error)) from None
    except ValueError as error:  # a URL no installed filesystem opens, or no credentials
        raise ConfigError(f"checkpoint_dir={run.checkpoint_location!r} is invalid: {error}") from None
    except OSError as error:  # the object store stayed unreachable through every retry
        raise ConfigError(f"checkpoint_dir={run.checkpoint_location!r} could not be read: {error}") from None


def resolve_run(config: TrainConfig, world: WorldInfo, threads: int) -> ResolvedRun:
    try:
        return _resolve_run(config, world, threads)
    except (ConfigError, OSError) as error:  # URLs in messages lose their credentials
        urls = (config.data.url, config.checkpoint.dir, config.checkpoint.resume)
        raise ConfigError(redact_text(str(error), *urls)) from None


def check_exit_routing(model_config: ElectraExitConfig, config: TrainConfig) -> None:
    """Capacity and random routing: no pipeline (its stages skip micro-batches whose tokens all exited,
    which a fixed capacity never empties) and a target the capacity level is steered toward."""
    routing = model_config.exit_routing
    if routing == "threshold" or not model_config.exit_enabled:
        return
    stages = config.parallelism.pipeline_stages
    if stages > 1:
        raise ConfigError(
            f"exit_routing={routing!r} is invalid with pipeline_stages={stages}; expected exit_routing='threshold' "
            f"(pipeline stages skip micro-batches whose tokens all exited, which a fixed capacity never empties)."
        )
    if config.exit_control.target_compute is None:
        raise ConfigError(
            f"target_compute=None is invalid with exit_routing={routing!r}; expected the fraction of token-layers "
            f"the capacity level is steered toward."
        )


def _resolve_run(config: TrainConfig, world: WorldInfo, threads: int) -> ResolvedRun:
    dataset = _open_dataset(config.data.url or DEFAULT_DATA_URL)
    model_config = config.model.build(dataset_model_fields(dataset), seq_len=dataset.seq_len)
    check_exit_routing(model_config, config)
    stages = config.parallelism.pipeline_stages
    config.parallelism.deepspeed_config = find_ds_config(config.parallelism.deepspeed_config)
    raw_ds_config = load_ds_config(config.parallelism.deepspeed_config)
    check_parallelism(raw_ds_config, stages, config.parallelism.deepspeed_config)
    if world.world_size % stages:
        raise ConfigError(
            f"pipeline_stages={stages} is invalid; expected a divisor of the world size {world.world_size}."
        )
    dp_size = world.world_size // stages
    if stages > 1 and is_layer_partition(config.parallelism.pipeline_partition):
        try:  # resolved once, here: every rank then builds the same split
            counts = parse_layer_counts(config.parallelism.pipeline_partition, stages, model_config.num_hidden_layers)
        except PartitionError as error:
            raise ConfigError(str(error)) from None
        config.parallelism.pipeline_partition = "layers:" + ",".join(map(str, counts))
    total_steps = config.schedule_steps(dataset.seq_len)
    ds_config = resolve_ds_config(
        raw_ds_config,
        config,
        dp_size=dp_size,
        total_steps=total_steps,
        monitor_dir=os.path.join(config.job.run_dir, "monitor"),
    )
    _check_resume_value(config.checkpoint.resume)
    if dataset.num_samples < config.training.global_batch_size:
        raise ConfigError(
            f"global_batch_size={config.training.global_batch_size} is invalid; the dataset "
            f"{dataset.url} holds only {dataset.num_samples} samples."
        )
    run = ResolvedRun(
        config=config,
        world=world,
        dataset=dataset,
        model_config=model_config,
        ds_config=ds_config,
        dp_size=dp_size,
        grad_accum=ds_config["gradient_accumulation_steps"],
        total_steps=total_steps,
        precision="bf16" if ds_config["bf16"]["enabled"] else "fp32",
        threads=threads,
    )
    run.run_plan = plan_checkpoints(run)
    return run
