"""The trainer's configuration: one dataclass per section, training presets, validation.

`TrainConfig` is the single source of truth for a run. It is built from a preset
(`TRAIN_PRESETS`), an optional saved config file and command-line flags (`dsexit.train.config.cli`,
which makes one flag per field: named after the field unless its metadata gives a `flag`,
with the field's docstring as its help), validated here before any process group exists,
printed once by rank 0 and saved with every checkpoint. The DeepSpeed JSON is resolved
against it in `dsexit.train.config.ds_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dsexit.model import ElectraExitConfig
from dsexit.model.config import PRESETS as MODEL_PRESETS
from dsexit.train.errors import ConfigError

DEFAULT_PRESET = "smoke"

RESUME_KEYWORDS = ("auto", "none")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_CHOICES = ("auto", "on", "off")
PROGRESS_MODES = ("auto", "bar", "lines")


def _fail(name: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid; expected {expected}.")


@dataclass
class JobConfig:
    """Where the run lives and how it is seeded."""

    run_dir: str = field(default="runs/electra", metadata={"metavar": "DIR"})
    """Local directory for logs, metrics, the resolved config and (by default) checkpoints."""
    seed: int = 1234
    """Seeds parameter init, the data order and the masking RNG (offset by rank)."""
    deterministic: bool = False
    """Deterministic kernels (`torch.use_deterministic_algorithms`, math attention on CUDA): on a GPU two
    runs, or a run and its resume, then agree bitwise, at some speed; on a CPU they agree anyway."""
    preset: str = field(default=DEFAULT_PRESET, metadata={"metavar": "NAME"})
    """Training preset the defaults come from: smoke (minutes on a CPU), small or base (the ELECTRA
    papers' recipes); see TRAIN_PRESETS."""


@dataclass
class ModelSection:
    """Which model: an `ElectraExitConfig` preset plus field overrides (exit settings included)."""

    preset: str = field(default="electra-tiny", metadata={"flag": "--model", "metavar": "PRESET"})
    """Model preset: electra-tiny, electra-small or electra-base."""
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"flag": "--model-set"})
    """Any `ElectraExitConfig` field, as FIELD=VALUE (a JSON value), e.g. exit_kv=drop; repeatable.
    Vocabulary and special-token ids always come from the dataset index."""

    def build(self, dataset_fields: dict[str, Any], seq_len: int = 0) -> ElectraExitConfig:
        """The model config for a dataset (its vocabulary fields, and position embeddings for at
        least `seq_len` tokens); raises ConfigError naming a bad field."""
        values = {**self.overrides, **dataset_fields}
        positions = {**MODEL_PRESETS.get(self.preset, {}), **values}.get(
            "max_position_embeddings", ElectraExitConfig.max_position_embeddings
        )
        if isinstance(positions, int) and positions < seq_len:
            values["max_position_embeddings"] = seq_len
        try:
            return ElectraExitConfig.from_preset(self.preset, **values)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None


@dataclass
class ExitControlConfig:
    """How the exit controller steers tau (threshold routing; the model's `exit_threshold` is its start) or
    the capacity level (capacity and random routing, `exit_routing`) during training."""

    target_compute: float | None = None
    """Fraction of token-layers to execute; when set, a controller steers tau toward it."""
    controller_gain: float = 4.0
    """Step size of the threshold controller, in logit(tau) per unit of compute-fraction error."""
    warmup_steps: int = field(default=0, metadata={"flag": "--exit-warmup-steps"})
    """No token exits during the first this many steps (the heads train meanwhile)."""
    min_confidence: float = 0.25
    """Floor under tau: the controller (with target_compute set) never lowers it below this; a fixed
    tau (the model's exit_threshold, no target) is left as given. Heads at the replaced-token
    prior give every token a confidence near 0, so their tokens keep full depth and compute stays
    above the target (the log line says `tau at floor`). The default separates heads that learned
    from heads at the prior (bench/README.md, "Confidence floor"). Under capacity routing the level
    falls only as far as the share of tokens the heads find above the floor allows; tokens forced
    out below it are counted (`forced_exit_share`)."""
    capacity_interval: int = 50
    """Capacity routing: steps between changes of the capacity level (a compiled step compiles once per
    level it visits)."""


@dataclass
class DataConfig:
    """Where samples come from."""

    url: str = field(default="", metadata={"flag": "--data", "metavar": "URL"})
    """Dataset URL (local path or fsspec URL); empty means the corpus embedded in the package."""
    shuffle_window: int = 16
    """Shards read at once, their samples interleaved (part of the deterministic order)."""
    prefetch: int = 8
    """Shards fetched ahead of the reader."""
    cache_dir: str | None = field(default=None, metadata={"flag": "--data-cache-dir", "metavar": "PATH"})
    """Local shard cache for remote datasets; default: RUN_DIR/shard-cache."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (filled into the DeepSpeed config's "auto" fields)."""

    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int | None = None
    """Linear warmup from 0 to lr, then linear decay to 0 at the schedule's last step.
    None: 10% of the schedule (at least 2 steps; shorter for a run of 1 or 2 steps)."""
    weight_decay: float = 0.01
    """Applied to weights only; biases and LayerNorm parameters get none (as in ELECTRA)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""


@dataclass
class TrainingConfig:
    """Batch sizes, precision and when to stop."""

    global_batch_size: int = 32
    """Samples per optimizer step over all data-parallel ranks (= micro x grad_accum x dp)."""
    micro_batch_size: int = 16
    """Samples per forward pass on one rank."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """bf16 where the hardware runs it natively (CUDA with bf16, or a CPU with AMX/AVX512-BF16), else fp32."""
    max_steps: int | None = 1000
    """Optimizer steps; also the length of the LR schedule. None: derived from max_tokens."""
    max_tokens: int | None = None
    """Stop after this many training tokens (global_batch_size x seq_len per step)."""
    compile: str = field(default="auto", metadata={"choices": COMPILE_CHOICES})
    """torch.compile of the training forward and loss (fullgraph, static shapes; CUDA graphs on CUDA):
    'auto' compiles on CUDA and not on a CPU, where the CPU kernels measured faster; ZeRO-3 and the
    pipeline stay eager. The first step's time, compilation included, is logged."""
    compile_backend: str = field(default="inductor", metadata={"metavar": "NAME"})
    """torch.compile backend ('inductor'; 'aot_eager' traces without generating code, to check a step)."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall clock. The learning-rate schedule then runs
    over the budget: its progress is the larger of steps / schedule steps and minutes /
    max_minutes, so the decay ends when the budget does (`budget_lr_factor`)."""


@dataclass
class ParallelismConfig:
    """How the work is split."""

    deepspeed_config: str = field(
        default="ds_configs/zero2.json", metadata={"flag": "--deepspeed", "metavar": "JSON", "nargs": "?"}
    )
    """DeepSpeed config: a JSON file, or a shipped one by name (ds_configs/zero{1,2,3}.json, pipeline.json).
    DeepSpeed's own form, --deepspeed --deepspeed_config FILE, works too."""
    pipeline_stages: int = 1
    """>1 selects pipeline parallelism (ZeRO 0/1 only, ds_configs/pipeline.json)."""
    pipeline_partition: str = field(default="type:DiscriminatorLayerPipe", metadata={"metavar": "HOW"})
    """How layers are split across stages: DeepSpeed's "parameters", "uniform" or "type:REGEX" (the
    default balances discriminator layers; stage 1 also holds embeddings and generator), or
    "layers:N0,N1,..." (discriminator layers per stage) or "expected:PROFILE.json" (counts that balance
    the expected work of stages that skip fully exited micro-batches: `dsexit/parallel/partition.py`)."""
    dist_timeout_s: float = field(default=1800.0, metadata={"flag": "--dist-timeout", "metavar": "SECONDS"})
    """Seconds a collective may wait for its peers before the run fails with an error naming
    them (a lost node, a cut network); also bounds the start-up rendezvous."""
    heartbeat_timeout_s: float = field(default=60.0, metadata={"flag": "--heartbeat-timeout", "metavar": "SECONDS"})
    """In a job of several nodes, a node whose heartbeat stops for this long (a host that vanished without
    closing its connections) is lost: the survivors exit with code 3 within it instead of waiting out
    --dist-timeout, and an elastic agent re-forms the job (docs/cluster.md). 0 turns the heartbeat off."""


@dataclass
class CheckpointConfig:
    """Checkpoint location, cadence, retention and resume."""

    dir: str = field(default="", metadata={"flag": "--checkpoint-dir", "metavar": "PATH_OR_URL"})
    """Local path or fsspec URL; empty: RUN_DIR/checkpoints. A URL is mirrored from a local
    staging copy in RUN_DIR/checkpoints."""
    interval: int = field(default=250, metadata={"flag": "--save-interval"})
    """Save every this many optimizer steps (and always at the end or on preemption)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = field(default="auto", metadata={"metavar": "auto|none|PATH"})
    """'auto' (newest complete checkpoint, if any), 'none', or a path to a checkpoint tag."""
    export_hf: bool = True
    """Write a Hugging Face export of the final checkpoint to RUN_DIR/hf."""
    start_over: bool = False
    """Start a new run in a run directory that holds another one, after moving that one aside to
    RUN_DIR.old-TIMESTAMP (nothing is deleted). Without it such a start is refused."""
    retries: int = field(default=6, metadata={"flag": "--checkpoint-retries"})
    """Retries (exponential backoff, as for data reads) of each object-store operation of the
    checkpoint mirror; an upload that still fails is retried at the next save."""
    trust_unverified: bool = field(default=False, metadata={"flag": "--trust-unverified-checkpoint"})
    """Resume a checkpoint whose completion marker lists no file digests (saved by an older dsexit):
    its files are unpickled unverified, which runs any code planted in them. Off: such a checkpoint
    is refused in one line."""


@dataclass
class MetricsConfig:
    """What rank 0 reports, and where."""

    log_interval: int = 10
    """Log a metrics line every this many steps."""
    progress: str = field(default="auto", metadata={"choices": PROGRESS_MODES})
    """'bar' on a terminal, 'lines' (plain key=value lines) otherwise; 'auto' picks."""
    tensorboard: bool = True
    """TensorBoard event files in RUN_DIR/monitor (when tensorboard is installed)."""
    csv: bool = True
    """DeepSpeed's CSV monitor files in RUN_DIR/monitor."""
    eval_interval: int = 250
    """Held-out evaluation every this many steps (and at the start and the end); 0 turns it off."""
    eval_samples: int = 512
    """Held-out samples evaluated (the first ones of the dataset's validation split)."""
    eval_batch_size: int = 64
    """Samples per forward pass of the held-out evaluation."""


@dataclass
class TrainConfig:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelSection = field(default_factory=ModelSection)
    exit_control: ExitControlConfig = field(default_factory=ExitControlConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = move_training_fields(values)
        sections = {}
        for section in dataclasses.fields(cls):
            section_type = section.default_factory().__class__
            given = dict(values.get(section.name, {}))
            known = {f.name for f in dataclasses.fields(section_type)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ConfigError(f"config section {section.name!r} has unknown field(s) {', '.join(unknown)}.")
            sections[section.name] = section_type(**given)
        return cls(**sections)

    def validate(self) -> None:
        """Checks that need no dataset and no process group."""
        job, training, optim, ckpt = self.job, self.training, self.optim, self.checkpoint
        control = self.exit_control
        if control.target_compute is not None and not 0.0 < control.target_compute <= 1.0:
            _fail("target_compute", control.target_compute, "a fraction of token-layers in (0, 1]")
        if control.controller_gain <= 0:
            _fail("controller_gain", control.controller_gain, "a positive step size")
        if not isinstance(control.warmup_steps, int) or control.warmup_steps < 0:
            _fail("exit_warmup_steps", control.warmup_steps, "a non-negative number of steps")
        interval = control.capacity_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            _fail("capacity_interval", interval, "a positive number of steps")
        floor = control.min_confidence
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor < 1.0:
            _fail("min_confidence", floor, "a confidence floor in [0, 1)")
        if self.model.preset not in MODEL_PRESETS:
            _fail("model", self.model.preset, f"one of {', '.join(MODEL_PRESETS)}")
        for name, value in (
            ("global_batch_size", training.global_batch_size),
            ("micro_batch_size", training.micro_batch_size),
            ("log_interval", self.metrics.log_interval),
            ("save_interval", ckpt.interval),
            ("keep_last", ckpt.keep_last),
            ("pipeline_stages", self.parallelism.pipeline_stages),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "a positive integer")
        partition = self.parallelism.pipeline_partition
        if partition not in ("parameters", "uniform") and not (
            partition.startswith(("type:", "layers:", "expected:")) and len(partition.split(":", 1)[1]) > 0
        ):
            _fail(
                "pipeline_partition",
                partition,
                '"parameters", "uniform", "type:REGEX", "layers:N0,N1,..." or "expected:PROFILE.json"',
            )
        if training.global_batch_size % training.micro_batch_size:
            _fail(
                "global_batch_size",
                training.global_batch_size,
                f"a multiple of micro_batch_size={training.micro_batch_size}",
            )
        if training.max_steps is None and training.max_tokens is None:
            _fail("max_steps", None, "a number of steps, or max_tokens to derive it from")
        for name, value in (("max_steps", training.max_steps), ("max_tokens", training.max_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                _fail(name, value, "a positive integer")
        if training.max_minutes is not None and not (math.isfinite(training.max_minutes) and training.max_minutes > 0):
            _fail("max_minutes", training.max_minutes, "a positive number of minutes")
        if not (math.isfinite(self.parallelism.dist_timeout_s) and self.parallelism.dist_timeout_s > 0):
            _fail("dist_timeout_s", self.parallelism.dist_timeout_s, "a positive number of seconds")
        if not (math.isfinite(self.parallelism.heartbeat_timeout_s) and self.parallelism.heartbeat_timeout_s >= 0):
            _fail("heartbeat_timeout_s", self.parallelism.heartbeat_timeout_s, "a number of seconds >= 0 (0: off)")
        if training.precision not in PRECISIONS:
            _fail("precision", training.precision, f"one of {', '.join(PRECISIONS)}")
        if training.compile not in COMPILE_CHOICES:
            _fail("compile", training.compile, f"one of {', '.join(COMPILE_CHOICES)}")
        if not isinstance(training.compile_backend, str) or not training.compile_backend:
            _fail("compile_backend", training.compile_backend, "a torch.compile backend name, e.g. inductor")
        if not (math.isfinite(optim.lr) and optim.lr > 0):
            _fail("lr", optim.lr, "a positive learning rate")
        if optim.warmup_steps is not None and optim.warmup_steps < 2:
            _fail("warmup_steps", optim.warmup_steps, "at least 2 steps (DeepSpeed's WarmupDecayLR takes its log)")
        if optim.weight_decay < 0 or optim.grad_clip < 0:
            name, value = (
                ("weight_decay", optim.weight_decay) if optim.weight_decay < 0 else ("grad_clip", optim.grad_clip)
            )
            _fail(name, value, "a non-negative number")
        for name, value, minimum in (
            ("eval_interval", self.metrics.eval_interval, 0),
            ("eval_samples", self.metrics.eval_samples, 1),
            ("eval_batch_size", self.metrics.eval_batch_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                _fail(name, value, "a positive integer" if minimum else "a non-negative integer (0: off)")
        if self.metrics.progress not in PROGRESS_MODES:
            _fail("progress", self.metrics.progress, f"one of {', '.join(PROGRESS_MODES)}")
        if not job.run_dir:
            _fail("run_dir", job.run_dir, "a directory path")
        if not ckpt.resume:
            _fail("resume", ckpt.resume, "'auto', 'none' or a checkpoint path")
        if not isinstance(ckpt.retries, int) or isinstance(ckpt.retries, bool) or ckpt.retries < 0:
            _fail("checkpoint_retries", ckpt.retries, "a non-negative integer")
        if self.data.shuffle_window < 1 or self.data.prefetch < 0:
            _fail(
                "shuffle_window" if self.data.shuffle_window < 1 else "prefetch",
                self.data.shuffle_window if self.data.shuffle_window < 1 else self.data.prefetch,
                "a positive window / a non-negative prefetch depth",
            )
        # The model overrides are checked once, when the model config is built for the dataset
        # (`ModelSection.build`, in dsexit.train.config.resolve): that needs its vocabulary and length.

    def schedule_steps(self, seq_len: int) -> int:
        """Optimizer steps the run (and its LR schedule) lasts."""
        steps = [s for s in (self.training.max_steps, self._steps_for_tokens(seq_len)) if s is not None]
        return min(steps)

    def warmup_steps(self, total_steps: int) -> int:
        """The user's warmup, or 10% of the schedule (at least 2 steps), shortened to fit a run of 1 or
        2 steps (DeepSpeed wants at least 1; it warms up over at least 2 and warns when that is longer)."""
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return max(1, min(max(2, total_steps // 10), total_steps - 1))

    def budget_lr_factor(self, step: int, total_steps: int, minutes: float) -> float:
        """The learning rate at `step` as a share of the peak, for a run with a time budget.

        Linear warmup over the warmup steps, then linear decay to 0 over the run's progress,
        the larger of the steps done and the budget spent: equal-wall-clock runs all finish
        their decay, whatever their speed.
        """
        warmup = self.warmup_steps(total_steps)
        progress = step / max(1, total_steps)
        if self.training.max_minutes is not None:
            progress = max(progress, minutes / self.training.max_minutes)
        return max(0.0, min(step / warmup if warmup else 1.0, 1.0 - progress))

    def _steps_for_tokens(self, seq_len: int) -> int | None:
        if self.training.max_tokens is None:
            return None
        return max(1, math.ceil(self.training.max_tokens / (self.training.global_batch_size * seq_len)))


_MOVED_MODEL_FIELDS = {
    "target_compute": "target_compute",
    "controller_gain": "controller_gain",
    "exit_warmup_steps": "warmup_steps",
}


def move_training_fields(values: dict[str, Any]) -> dict[str, Any]:
    """A config saved before the controller's settings left the model overrides, in today's sections."""
    overrides = (values.get("model") or {}).get("overrides") or {}
    moved = {new: overrides[old] for old, new in _MOVED_MODEL_FIELDS.items() if old in overrides}
    if not moved:
        return values
    model = {**values["model"], "overrides": {k: v for k, v in overrides.items() if k not in _MOVED_MODEL_FIELDS}}
    return {**values, "model": model, "exit_control": {**moved, **(values.get("exit_control") or {})}}


TRAIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The default: about 6 minutes for one process on a 2-core CPU, on the embedded corpus; the
    # discriminator learns (held-out verdict on the last line), exits start after 200 steps, and the
    # controller holds compute near 0.7. Everything a real run does (checkpoints, resume, export)
    # happens. Where it differs from ELECTRA's paper (Clark et al. 2020: generator 1/4 of the
    # discriminator, sampled at temperature 1, lr 5e-4 for Small), it is for this budget, by
    # measurement (bench/README.md, "Smoke preset"): sampled at temperature 1, the MLM generator
    # reaches the unigram plateau within a few hundred steps and its discriminator stays at the
    # replaced-token prior for the whole run; at temperature 2 it learns within the first 250 steps.
    # The generator is electra-tiny's (1/2 of the discriminator's width) and lr 2e-3 (a tiny model,
    # 800 short steps).
    "smoke": {
        "model": {"preset": "electra-tiny", "overrides": {"generator_temperature": 2.0}},
        "exit_control": {"warmup_steps": 200, "target_compute": 0.7},
        "optim": {"lr": 2e-3},
        "training": {"global_batch_size": 32, "micro_batch_size": 16, "max_steps": 800},
        "checkpoint": {"interval": 250, "keep_last": 2},
        "metrics": {"log_interval": 20},
    },
    # Clark et al. 2020, ELECTRA-Small: batch 128, lr 5e-4, 10k warmup, 1M steps, seq 128.
    "small": {
        "model": {"preset": "electra-small"},
        "exit_control": {"warmup_steps": 10000, "target_compute": 0.6},
        "optim": {"lr": 5e-4, "warmup_steps": 10000},
        "training": {"global_batch_size": 128, "micro_batch_size": 128, "max_steps": 1_000_000},
        "checkpoint": {"interval": 5000, "keep_last": 3},
        "metrics": {"log_interval": 100},
    },
    # ELECTRA-Base: batch 256, lr 2e-4, 10k warmup, 766k steps.
    "base": {
        "model": {"preset": "electra-base"},
        "exit_control": {"warmup_steps": 10000, "target_compute": 0.6},
        "optim": {"lr": 2e-4, "warmup_steps": 10000},
        "training": {"global_batch_size": 256, "micro_batch_size": 32, "max_steps": 766_000},
        "checkpoint": {"interval": 5000, "keep_last": 3},
        "metrics": {"log_interval": 100},
    },
}


def preset_values(name: str) -> dict[str, dict[str, Any]]:
    """The sections a preset sets (a copy), its name included; ConfigError for an unknown name."""
    if name not in TRAIN_PRESETS:
        _fail("preset", name, f"one of {', '.join(TRAIN_PRESETS)}")
    values = {section: dict(fields) for section, fields in TRAIN_PRESETS[name].items()}
    values.setdefault("job", {})["preset"] = name
    return values


def preset_config(name: str) -> TrainConfig:
    return TrainConfig.from_dict(preset_values(name))
