"""From a validated `TrainConfig` to everything a run needs, before the trainer is built.

`resolve_run`, before any process group exists: opens the dataset index (vocabulary,
special tokens, sequence length), builds the model config, derives the schedule length and
the data-parallel layout, and resolves the DeepSpeed JSON. Then the checkpoint side: every
location the run will write is probed (a small object written and removed), the checkpoint
`--resume` selects is read (its marker only, by the trainer's own rule,
checkpoint/resume.py) and must fit this model and seed, the DeepSpeed config asks for the
universal format if that checkpoint was saved at another data-parallel size, and the
run-directory plan is made (a new run, a continuation, a rollback or a fork; see
checkpoint/rundir.py). Any user error surfaces here as one `ConfigError`, credentials in
URLs masked, and nothing is written. The caller's `TrainConfig` is never changed: the
result, `ResolvedRun`, is a new value; it is what rank 0 prints once and what every
checkpoint saves.

`begin_run`, once the process group exists: carries out the plan's moves (`--start-over`)
and agrees on the run id on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from dsexit.data import DEFAULT_DATA_URL, DatasetFormatError, DatasetIndex
from dsexit.host_allocator import allocator_in_use
from dsexit.model import ElectraExitConfig
from dsexit.parallel.partition import PartitionError, is_layer_partition, parse_layer_counts
from dsexit.storage import RetryPolicy, is_remote, local_path, open_url_fs, redact, redact_text
from dsexit.train.checkpoint.files import CheckpointRef, RemoteCheckpoints, saved_model_config
from dsexit.train.checkpoint.lease import hold_lease
from dsexit.train.checkpoint.resume import choose_checkpoint
from dsexit.train.checkpoint.rundir import (
    ROLLED_BACK,
    RunDirError,
    RunPlan,
    lock_run_dir,
    move_aside,
    new_run_id,
    plan_run,
    restore_log,
    roll_aside,
)
from dsexit.train.checkpoint.signing import load_key
from dsexit.train.checkpoint.store import RemoteMirror, StorageError, probe_local_dir
from dsexit.train.checkpoint.universal import needs_universal
from dsexit.train.cluster.distributed import WorldInfo, barrier, broadcast_object
from dsexit.train.config.ds_config import (
    check_parallelism,
    find_ds_config,
    load_ds_config,
    resolve_ds_config,
    zero_stage,
)
from dsexit.train.config.train_config import RESUME_KEYWORDS, ParallelismConfig, TrainConfig
from dsexit.train.errors import CheckpointError, ConfigError
from dsexit.train.metrics import setup_logging

log = logging.getLogger("dsexit")

CONFIG_FILE = "config.json"


@dataclass
class ResolvedRun:
    """Everything a run needs, settled before the trainer is built. Each step of resolution makes a
    new one (`dataclasses.replace`) instead of changing the one it was given."""

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
    resume_from: CheckpointRef | None = None
    """The checkpoint `--resume` selects, by its marker (the trainer fetches and verifies it)."""
    run_id: str | None = None
    """The run's id, the same on every rank; set by `begin_run` once the process group exists."""

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

    def resuming(self, ref: CheckpointRef | None) -> ResolvedRun:
        """This run, set to load `ref`: a checkpoint saved at another data-parallel size or ZeRO stage
        loads through DeepSpeed's universal format (checkpoint/universal.py), which the engine must be
        built for. The same run when nothing changes."""
        if ref is not None:
            self._check_same_data_order(ref)
        checkpoint = self.ds_config.get("checkpoint", {})
        if ref is None or checkpoint.get("load_universal") or not needs_universal(ref, self.dp_size, self.zero_stage):
            return self
        return dataclasses.replace(
            self, ds_config={**self.ds_config, "checkpoint": {**checkpoint, "load_universal": True}}
        )

    def _check_same_data_order(self, ref: CheckpointRef) -> None:
        """ConfigError, before DeepSpeed opens anything, when `ref` was saved reading other data or in another
        order than this run would (the data reader refuses such a state; it would say so only after the
        engine had loaded). Values a marker lacks (older saves) are left to the reader."""
        saved = (ref.meta.get("config") or {}).get("train") or {}
        derived = (ref.meta.get("config") or {}).get("derived") or {}
        mine = {
            "dataset_fingerprint": (derived.get("dataset_fingerprint"), self.dataset.fingerprint),
            "global_batch_size": (
                (saved.get("training") or {}).get("global_batch_size"),
                self.config.training.global_batch_size,
            ),
            "seed": ((saved.get("job") or {}).get("seed"), self.config.job.seed),
            "shuffle_window": ((saved.get("data") or {}).get("shuffle_window"), self.config.data.shuffle_window),
        }
        differing = [f"{key} {was!r} (this run: {now!r})" for key, (was, now) in mine.items() if was not in (None, now)]
        if differing:
            raise ConfigError(
                f"checkpoint {ref.path} was saved by a run with {'; '.join(differing)}: resuming it would not continue "
                f"its data order; resume it with its own data and settings, or start a new run (another --run-dir)."
            )

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
                    "dataset_fingerprint": self.dataset.fingerprint,
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


def _check_export_inputs(dataset: DatasetIndex) -> None:
    """The Hugging Face export at the end of a run needs the dataset's tokenizer file: checked now, so a
    run does not train to the end and then fail there."""
    url = dataset.tokenizer_url
    try:
        fs, path = open_url_fs(url)
        present = fs.isfile(path)
    except OSError as error:
        raise ConfigError(f"the dataset's tokenizer file {redact_text(url)} cannot be read ({error}).") from None
    if not present:
        raise ConfigError(
            f"the dataset's tokenizer file {redact_text(url)} does not exist; the Hugging Face export at the "
            "end of the run needs it (restore it from prepare_data's output, or pass --no-export-hf)."
        )


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


def _chosen_checkpoint(resume: str, root: str, mirror: RemoteCheckpoints | None) -> CheckpointRef | None:
    """The checkpoint `--resume` selects, by its marker, by the rule the trainer applies
    (`choose_checkpoint`); nothing is downloaded."""
    try:
        return choose_checkpoint(resume, root, mirror)
    except (FileNotFoundError, CheckpointError) as error:
        if resume in RESUME_KEYWORDS:
            raise
        raise ConfigError(f"resume={resume!r} is invalid: {error}") from None


def plan_checkpoints(run: ResolvedRun) -> tuple[RunPlan, CheckpointRef | None]:
    """Probe, choose, check the fit, and plan the run directory: (the plan, the checkpoint chosen);
    ConfigError on any user error."""
    ckpt = run.config.checkpoint
    try:
        load_key()  # a key file named but unreadable fails here, before any work
        mirror = (
            RemoteCheckpoints(run.checkpoint_location, run.retry_policy())
            if is_remote(run.checkpoint_location)
            else None
        )
        _probe_locations(run, mirror.remote if mirror else None)
        chosen = _chosen_checkpoint(ckpt.resume, run.checkpoint_root, mirror)
        if chosen is not None:
            check_fits(chosen, run.model_config, run.config.job.seed)
        plan = plan_run(
            run_dir=run.run_dir,
            checkpoint_root=run.checkpoint_root,
            resume=ckpt.resume,
            start_over=ckpt.start_over,
            chosen=chosen,
            remote_steps=mirror.steps() if mirror else [],
            remote_shown=mirror.remote.shown if mirror else None,
        )
        return plan, chosen
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


def _resolve_partition(parallelism: ParallelismConfig, num_layers: int) -> ParallelismConfig:
    """A layer partition resolved into counts once, here, so that every rank builds the same split."""
    if parallelism.pipeline_stages == 1 or not is_layer_partition(parallelism.pipeline_partition):
        return parallelism
    try:
        counts = parse_layer_counts(parallelism.pipeline_partition, parallelism.pipeline_stages, num_layers)
    except PartitionError as error:
        raise ConfigError(str(error)) from None
    return dataclasses.replace(parallelism, pipeline_partition="layers:" + ",".join(map(str, counts)))


DEFAULT_EXIT_ROUTING = "capacity"


def default_exit_routing(model_config: ElectraExitConfig, config: TrainConfig) -> ElectraExitConfig:
    """The trainer's exit routing where the user names none (`--exit-routing`): capacity routing, whose
    shapes are static (it compiles, and CUDA-graphs), at equal held-out quality with threshold routing
    (bench/README.md, the routing study); threshold routing for pipeline runs (their stages skip
    micro-batches whose tokens all exited, which a fixed capacity never empties) and for runs without
    a target compute (a fixed tau)."""
    if "exit_routing" in config.model.overrides or not model_config.exit_enabled:
        return model_config
    fits = config.parallelism.pipeline_stages == 1 and config.exit_control.target_compute is not None
    return dataclasses.replace(model_config, exit_routing=DEFAULT_EXIT_ROUTING if fits else "threshold")


def _routing_of_resumed(
    model_config: ElectraExitConfig, config: TrainConfig, chosen: CheckpointRef | None
) -> ElectraExitConfig:
    """A resume keeps the routing its checkpoint was trained with where the user names none (a
    checkpoint from before capacity routing was threshold-routed): the exit controller's state is the
    routing's own."""
    saved = saved_model_config(chosen.meta) if chosen is not None else None
    if saved is None or "exit_routing" in config.model.overrides or not model_config.exit_enabled:
        return model_config
    routing = ElectraExitConfig.from_saved(saved).exit_routing
    if routing != model_config.exit_routing:
        log.info(
            "resuming %s, trained with %s routing: the run keeps it (--exit-routing overrides it)", chosen.tag, routing
        )
        return dataclasses.replace(model_config, exit_routing=routing)
    return model_config


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
    """The user's `config` is left as it was: what resolution settles goes into a new one."""
    dataset = _open_dataset(config.data.url or DEFAULT_DATA_URL)
    model_config = default_exit_routing(
        config.model.build(dataset_model_fields(dataset), seq_len=dataset.seq_len), config
    )
    check_exit_routing(model_config, config)
    stages = config.parallelism.pipeline_stages
    parallelism = dataclasses.replace(
        config.parallelism, deepspeed_config=find_ds_config(config.parallelism.deepspeed_config)
    )
    raw_ds_config = load_ds_config(parallelism.deepspeed_config)
    check_parallelism(raw_ds_config, stages, parallelism.deepspeed_config)
    if world.world_size % stages:
        raise ConfigError(
            f"pipeline_stages={stages} is invalid; expected a divisor of the world size {world.world_size}."
        )
    dp_size = world.world_size // stages
    parallelism = _resolve_partition(parallelism, model_config.num_hidden_layers)
    config = dataclasses.replace(config, parallelism=parallelism)
    total_steps = config.schedule_steps(dataset.seq_len)
    ds_config = resolve_ds_config(
        raw_ds_config,
        config,
        dp_size=dp_size,
        total_steps=total_steps,
        monitor_dir=os.path.join(config.job.run_dir, "monitor"),
    )
    _check_resume_value(config.checkpoint.resume)
    if config.checkpoint.export_hf:
        _check_export_inputs(dataset)
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
    plan, chosen = plan_checkpoints(run)
    run = dataclasses.replace(run, model_config=_routing_of_resumed(run.model_config, config, chosen))
    return dataclasses.replace(run, run_plan=plan, resume_from=chosen).resuming(chosen)


def _roll_aside(run: ResolvedRun, plan: RunPlan) -> None:
    """A rollback's newer steps leave the new line's way before it reaches their numbers: each node's
    local rank 0 moves its own copies into `rolled-back-TIMESTAMP/`, rank 0 the mirror's (copied, then
    deleted). A collective: every rank calls it."""
    stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S") if run.world.is_main else None)
    if run.world.local_rank == 0:
        folder = roll_aside(run.checkpoint_root, plan.rolled_back, stamp)
        if folder:
            log.warning(
                "rolled back to %s: the newer checkpoints %s moved aside to %s (nothing was deleted)",
                run.resume_from.tag,
                ", ".join(plan.rolled_back),
                folder,
            )
    if run.world.is_main and is_remote(run.checkpoint_location):
        mirror = RemoteCheckpoints(run.checkpoint_location, run.retry_policy())
        newer = sorted(tag for tag, meta in mirror.markers().items() if meta["step"] > run.resume_from.step)
        for tag in newer:
            mirror.remote.move(tag, f"{ROLLED_BACK}{stamp}")
        if newer:
            log.warning(
                "rolled back: the newer checkpoints %s on %s moved aside to %s%s/",
                ", ".join(newer),
                mirror.remote.shown,
                ROLLED_BACK,
                stamp,
            )
    barrier()


def hold_run_dir(run: ResolvedRun) -> None:
    """Rank 0, before anything is written to the run directory: its lock, and for a remote checkpoint
    directory the store's lease, so that a second trainer started on either is refused in one line
    (ConfigError naming the holder)."""
    if run.world.is_main:
        try:
            lock_run_dir(run.run_dir)
            if is_remote(run.checkpoint_location):  # and the store's lease (lease.py)
                hold_lease(run.checkpoint_location, RemoteMirror(run.checkpoint_location, run.retry_policy()))
        except (RunDirError, CheckpointError) as error:
            raise ConfigError(str(error)) from None
        except OSError as error:
            raise ConfigError(
                f"checkpoint_dir={run.checkpoint_location!r}: its lease could not be taken ({error})"
            ) from None


def begin_run(run: ResolvedRun) -> ResolvedRun:
    """Resolution's last step, once the process group exists and before the trainer is built: rank 0
    moves an old run aside (`--start-over`: the plan names what; if the run directory moved, its log
    went with it, so logging starts again in a new one), and every rank gets the run's id (the one
    continued, or a new one from rank 0)."""
    plan = run.run_plan or RunPlan("new", None)
    if plan.mode == "rollback":
        _roll_aside(run, plan)
    run_id = None
    if run.world.is_main:
        if plan.move_aside:
            moved = move_aside(plan.move_aside)
            if run.run_dir in moved:  # the log and the lock moved with the old run: new ones here
                lock_run_dir(run.run_dir)
                setup_logging(run.world, run.run_dir)
                restore_log(moved[run.run_dir], plan.log_state)
                log.info("resolved config:\n%s", run.to_json())
            for old, new in moved.items():
                log.warning("--start-over: moved %s aside to %s (nothing was deleted)", old, new)
        run_id = plan.run_id or new_run_id()
    return dataclasses.replace(run, run_id=broadcast_object(run_id))
