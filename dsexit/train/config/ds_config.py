"""The DeepSpeed JSON: loading, the supported parallelism matrix, resolving "auto" fields.

The JSON files in `dsexit/train/config/ds_configs/` (package data; the repository's `ds_configs/`
links to them) own what is DeepSpeed's business (ZeRO stage, bucket
sizes, optimizer type and betas). Fields the trainer owns are written "auto" there and
filled from `TrainConfig` here: batch sizes, learning rate and schedule, weight decay,
gradient clipping, precision, monitor paths. A concrete value where the trainer has its
own is allowed only if the two agree, so there is one source of truth and otherwise one
error listing every disagreement (as Hugging Face's `fill_match` does). Everything here runs
before any process group exists.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from dsexit.train.config.train_config import TrainConfig
from dsexit.train.errors import ConfigError

AUTO = "auto"
PIPELINE_ZERO_STAGES = (0, 1)  # DeepSpeed's PipelineEngine asserts ZeRO < 2
SUPPORTED_COMBINATIONS = (
    "data parallel with ZeRO 0, 1, 2 or 3 (ds_configs/zero1.json, zero2.json, zero3.json); "
    "pipeline parallel (--pipeline-stages N) with ZeRO 0 or 1 (ds_configs/pipeline.json)"
)


PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs")
PACKAGED_NAMES = ("zero1.json", "zero2.json", "zero3.json", "pipeline.json")


def find_ds_config(path: str) -> str:
    """The file to read for `--deepspeed PATH`: PATH itself when it exists; otherwise a config shipped
    with the package, named as `zero2.json` or as in a source checkout, `ds_configs/zero2.json`
    (so the default and the README's commands work from any directory and from an installed wheel)."""
    if os.path.isfile(path):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    if name in PACKAGED_NAMES and parent in ("", "ds_configs"):
        return os.path.join(PACKAGED_DIR, name)
    return path


def load_ds_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(
            f"DeepSpeed config {path!r} does not exist; expected a JSON file, or one of the shipped "
            f"configs by name ({', '.join(PACKAGED_NAMES)})."
        )
    try:
        with open(path) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path!r} must hold a JSON object.")
    return config


def zero_stage(ds_config: dict[str, Any], path: str = "the DeepSpeed config") -> int:
    """zero_optimization.stage (0 when absent); ConfigError unless it is the integer 0, 1, 2 or 3."""
    section = ds_config.get("zero_optimization", {})
    if not isinstance(section, dict):
        raise ConfigError(f'{path} sets zero_optimization={section!r}; expected an object such as {{"stage": 2}}.')
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path} sets zero_optimization.stage={stage!r}; expected the integer 0, 1, 2 or 3.")
    return stage


def check_parallelism(ds_config: dict[str, Any], pipeline_stages: int, path: str) -> None:
    """Reject unsupported (pipeline, ZeRO) combinations with one message naming the supported ones."""
    stage = zero_stage(ds_config, path)
    is_pipeline_config = "pipeline" in ds_config
    if pipeline_stages > 1 and stage not in PIPELINE_ZERO_STAGES:
        raise ConfigError(
            f"--pipeline-stages {pipeline_stages} with ZeRO stage {stage} ({path}) is not supported; "
            f"supported combinations: {SUPPORTED_COMBINATIONS}."
        )
    if is_pipeline_config and pipeline_stages == 1:
        raise ConfigError(
            f"{path} is a pipeline config; pass --pipeline-stages N with N >= 2, "
            f"or use ds_configs/zero1.json, zero2.json or zero3.json for data parallelism."
        )


def bf16_supported() -> bool:
    """Native bf16: a CUDA device that has it, or a CPU with AMX-BF16 / AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def _fill(section: dict[str, Any], key: str, value: Any, where: str, source: str, mismatches: list[str]) -> None:
    """Set an "auto" (or absent) field; a concrete one must agree with the trainer's value, or the
    disagreement joins `mismatches` (all of them are reported at once, by `resolve_ds_config`)."""
    given = section.get(key, AUTO)
    if given == AUTO:
        section[key] = value
    elif given != value and not (
        isinstance(given, (int, float))
        and isinstance(value, (int, float))
        and abs(given - value) <= 1e-12 * max(abs(given), abs(value))
    ):
        mismatches.append(f"{where}.{key}={given!r} but the trainer has {source}={value!r}")


def resolve_precision(ds_config: dict[str, Any], requested: str, mismatches: list[str]) -> str:
    if ds_config.get("fp16", {}).get("enabled") in (True, AUTO):
        raise ConfigError(
            'the DeepSpeed config enables fp16; this trainer runs bf16 or fp32 (use "bf16": {"enabled": "auto"}).'
        )
    bf16 = ds_config.setdefault("bf16", {"enabled": AUTO})
    if requested == AUTO:
        requested = "bf16" if (bf16_supported() if bf16.get("enabled", AUTO) == AUTO else bf16["enabled"]) else "fp32"
    if requested == "bf16" and not bf16_supported():
        raise ConfigError(
            "precision='bf16' was requested but this hardware has no native bf16 "
            "(no CUDA bf16, no amx_bf16/avx512_bf16 CPU flag); use --precision fp32 or auto."
        )
    _fill(bf16, "enabled", requested == "bf16", "bf16", "precision", mismatches)
    return requested


def resolve_batch(ds_config: dict[str, Any], config: TrainConfig, dp_size: int, mismatches: list[str]) -> int:
    """Fill the three batch fields; returns gradient accumulation steps."""
    training = config.training
    per_step = training.micro_batch_size * dp_size
    if training.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={training.global_batch_size} is not a multiple of micro_batch_size="
            f"{training.micro_batch_size} x data-parallel size {dp_size}; train_batch_size must equal "
            f"micro_batch_size x gradient_accumulation_steps x data-parallel size."
        )
    grad_accum = training.global_batch_size // per_step
    _fill(ds_config, "train_batch_size", training.global_batch_size, "<top level>", "global_batch_size", mismatches)
    _fill(
        ds_config,
        "train_micro_batch_size_per_gpu",
        training.micro_batch_size,
        "<top level>",
        "micro_batch_size",
        mismatches,
    )
    _fill(
        ds_config,
        "gradient_accumulation_steps",
        grad_accum,
        "<top level>",
        f"global_batch_size / (micro_batch_size x dp {dp_size})",
        mismatches,
    )
    return grad_accum


def resolve_schedule(ds_config: dict[str, Any], config: TrainConfig, total_steps: int, mismatches: list[str]) -> None:
    optim, warmup_steps = config.optim, config.warmup_steps(total_steps)
    if optim.warmup_steps is not None and warmup_steps >= total_steps:  # a derived warmup always fits
        raise ConfigError(
            f"warmup_steps={warmup_steps} is invalid; expected fewer than the schedule's "
            f"{total_steps} steps (max_steps / max_tokens)."
        )
    optimizer = ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", optim.lr, "optimizer.params", "lr", mismatches)
    _fill(params, "weight_decay", optim.weight_decay, "optimizer.params", "weight_decay", mismatches)
    _fill(ds_config, "gradient_clipping", optim.grad_clip, "<top level>", "grad_clip", mismatches)
    scheduler = ds_config.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    if scheduler.get("type") != "WarmupDecayLR":
        raise ConfigError(
            f"the DeepSpeed config's scheduler.type={scheduler.get('type')!r} is unsupported; "
            f'expected "WarmupDecayLR" (linear warmup, then linear decay).'
        )
    sched = scheduler.setdefault("params", {})
    _fill(sched, "warmup_min_lr", 0.0, "scheduler.params", "warmup_min_lr", mismatches)
    _fill(sched, "warmup_max_lr", optim.lr, "scheduler.params", "lr", mismatches)
    _fill(sched, "warmup_num_steps", warmup_steps, "scheduler.params", "warmup_steps", mismatches)
    _fill(sched, "total_num_steps", total_steps, "scheduler.params", "schedule steps", mismatches)
    _fill(sched, "warmup_type", "linear", "scheduler.params", "warmup_type", mismatches)


def resolve_monitors(ds_config: dict[str, Any], config: TrainConfig, monitor_dir: str, mismatches: list[str]) -> None:
    wanted = {"tensorboard": config.metrics.tensorboard, "csv_monitor": config.metrics.csv}
    if wanted["tensorboard"]:
        try:
            import tensorboard  # noqa: F401  (DeepSpeed's monitor needs it)
        except ImportError:
            wanted["tensorboard"] = False
    for name, enabled in wanted.items():
        section = ds_config.setdefault(name, {"enabled": AUTO})
        if section.get("enabled", AUTO) == AUTO:
            section["enabled"] = enabled
        _fill(section, "output_path", os.path.join(monitor_dir, ""), name, "RUN_DIR/monitor", mismatches)
        _fill(section, "job_name", name.replace("_monitor", ""), name, "job name", mismatches)


def _find_auto(node: Any, path: str = "") -> list[str]:
    if node == AUTO:
        return [path or "<root>"]
    if isinstance(node, dict):
        return [hit for key, value in node.items() for hit in _find_auto(value, f"{path}.{key}" if path else key)]
    return []


def resolve_ds_config(
    raw: dict[str, Any], config: TrainConfig, *, dp_size: int, total_steps: int, monitor_dir: str
) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled; raises ConfigError on any conflict, one error
    naming every field where the JSON and the trainer disagree.

    The caller has run `check_parallelism` on `raw`."""
    ds_config, mismatches = copy.deepcopy(raw), []
    resolve_precision(ds_config, config.training.precision, mismatches)
    resolve_batch(ds_config, config, dp_size, mismatches)
    resolve_schedule(ds_config, config, total_steps, mismatches)
    resolve_monitors(ds_config, config, monitor_dir, mismatches)
    if mismatches:
        raise ConfigError(
            f"the DeepSpeed config disagrees with the trainer: it sets {'; '.join(mismatches)}; "
            f'set {"these" if len(mismatches) > 1 else "it"} to "auto" in the JSON or make the two '
            f"agree."
        )
    ds_config.setdefault("steps_per_print", 10**9)  # the trainer reports progress itself
    left = _find_auto(ds_config)
    if left:
        raise ConfigError(
            f'the DeepSpeed config has "auto" at {", ".join(left)}, which the trainer does not fill; '
            f"give concrete values there."
        )
    check_against_deepspeed(ds_config)
    return ds_config


class _KeyReads(dict):
    """A dict that records which keys are read (shared by its shallow copies, as DeepSpeed makes one)."""

    def __init__(self, values: dict[str, Any], seen: set[str] | None = None):
        super().__init__(values)
        self.seen = set() if seen is None else seen

    def _read(self, key: str) -> None:
        self.seen.add(key)

    def __getitem__(self, key):
        self._read(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._read(key)
        return super().__contains__(key)

    def get(self, key, default=None):
        self._read(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self._read(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self._read(key)
        return super().setdefault(key, default)

    def __copy__(self):
        return _KeyReads(self, self.seen)


def check_against_deepspeed(ds_config: dict[str, Any]) -> None:
    """ConfigError, in one line, for what the installed DeepSpeed would reject or ignore: a key its
    config never reads (a typo DeepSpeed accepts silently at the top level), a nested key or value its
    config models refuse (a pydantic traceback there), an optimizer type it cannot build (an assertion
    once the engine starts). Runs DeepSpeed's own config parser on a copy, before any process group."""
    import logging

    import torch
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger
    from pydantic import ValidationError

    version = _deepspeed_version()
    # Without a process group DeepSpeed checks the batch sizes at world size 1: leave the global batch out.
    reads = _KeyReads({key: value for key, value in ds_config.items() if key != "train_batch_size"})
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(reads)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(
            f"the DeepSpeed config is invalid for DeepSpeed {version}: {error.title} field {where!r}: {first['msg']} "
            f"(input {first.get('input')!r})."
        ) from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"the DeepSpeed config is invalid for DeepSpeed {version}: {error}") from None
    finally:
        logger.setLevel(level)
    known = reads.seen | {value for value in vars(constants).values() if isinstance(value, str)}
    unknown = sorted(set(ds_config) - known - {"train_batch_size"})
    if unknown:
        raise ConfigError(
            f"the DeepSpeed config has key(s) {', '.join(map(repr, unknown))} that DeepSpeed {version} does not "
            "read; check the spelling against DeepSpeed's config documentation."
        )
    optimizer = (ds_config.get("optimizer") or {}).get("type")
    if optimizer is not None and not (
        str(optimizer).lower() in DEEPSPEED_OPTIMIZERS or getattr(torch.optim, str(optimizer), None) is not None
    ):
        raise ConfigError(
            f"the DeepSpeed config sets optimizer.type={optimizer!r}; expected one of DeepSpeed's "
            f"({', '.join(DEEPSPEED_OPTIMIZERS)}) or a torch.optim class name such as 'AdamW'."
        )


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
