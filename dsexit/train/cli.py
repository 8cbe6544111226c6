"""Command line -> `TrainConfig`: preset, then an optional saved config file, then flags.

Each flag names the config field it sets (`FLAG_FIELDS`), so `--help`, the resolved
config and the saved config speak the same names. Exit settings and other model
fields become `model.overrides`. Launchers' own arguments (`--local_rank`) are accepted
and ignored: ranks are discovered in `dsexit.train.distributed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Sequence

from dsexit.model.config import EXIT_CRITERIA
from dsexit.train.config import (PRECISIONS, PROGRESS_MODES, TRAIN_PRESETS, ConfigError, TrainConfig,
                                 preset_config)

# flag destination -> (section, field)
FLAG_FIELDS = {
    "run_dir": ("job", "run_dir"), "seed": ("job", "seed"), "deterministic": ("job", "deterministic"),
    "model": ("model", "preset"),
    "target_compute": ("exit_control", "target_compute"), "exit_warmup_steps": ("exit_control", "warmup_steps"),
    "data": ("data", "url"), "data_cache_dir": ("data", "cache_dir"),
    "lr": ("optim", "lr"), "warmup_steps": ("optim", "warmup_steps"),
    "weight_decay": ("optim", "weight_decay"), "grad_clip": ("optim", "grad_clip"),
    "global_batch_size": ("training", "global_batch_size"), "micro_batch_size": ("training", "micro_batch_size"),
    "precision": ("training", "precision"), "max_steps": ("training", "max_steps"),
    "max_tokens": ("training", "max_tokens"), "max_minutes": ("training", "max_minutes"),
    "deepspeed": ("parallelism", "deepspeed_config"), "pipeline_stages": ("parallelism", "pipeline_stages"),
    "pipeline_partition": ("parallelism", "pipeline_partition"),
    "dist_timeout": ("parallelism", "dist_timeout_s"),
    "checkpoint_dir": ("checkpoint", "dir"), "save_interval": ("checkpoint", "interval"),
    "keep_last": ("checkpoint", "keep_last"), "resume": ("checkpoint", "resume"),
    "export_hf": ("checkpoint", "export_hf"), "start_over": ("checkpoint", "start_over"),
    "checkpoint_retries": ("checkpoint", "retries"),
    "log_interval": ("metrics", "log_interval"), "progress": ("metrics", "progress"),
    "tensorboard": ("metrics", "tensorboard"), "csv": ("metrics", "csv"),
    "eval_interval": ("metrics", "eval_interval"), "eval_samples": ("metrics", "eval_samples"),
}
SECTIONS = tuple(field.name for field in dataclasses.fields(TrainConfig))
# flag destination -> ElectraExitConfig field
MODEL_FLAGS = ("exit_enabled", "min_exit_layer", "exit_threshold", "exit_kv", "aux_weight", "generator", "mask_prob", "disc_weight", "exit_criterion",
               "exit_special_tokens", "generator_temperature", "replacement_mix", "replacement_mix_steps")


_NONE = "none"  # a flag value that sets a field to None (argparse's None means "not given")
NONE_FLAGS = ("target_compute",)  # FLAG_FIELDS whose flag takes _NONE (others, like --resume none, keep the word)


def _optional_float(text: str) -> float | str:
    return _NONE if text.lower() == _NONE else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py", description="Pre-train ELECTRA with token-level early exit on DeepSpeed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=None)
    add = parser.add_argument
    add("--preset", default="smoke", choices=sorted(TRAIN_PRESETS), help="training preset the defaults come from")
    add("--config", metavar="JSON", help="a saved config.json to start from (flags still override it)")
    add("--dry-run", action="store_true", help="print the resolved config and exit")

    job = parser.add_argument_group("job")
    job.add_argument("--run-dir", help="directory for logs, metrics, config and checkpoints")
    job.add_argument("--seed", type=int)
    job.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                     help="deterministic kernels: bitwise-repeatable GPU runs and resumes, somewhat slower")

    model = parser.add_argument_group("model and early exit")
    model.add_argument("--model", help="model preset: electra-tiny, electra-small, electra-base")
    model.add_argument("--exit", dest="exit_enabled", action=argparse.BooleanOptionalAction,
                       help="enable token-level early exit")
    model.add_argument("--min-exit-layer", type=int)
    model.add_argument("--exit-threshold", type=float, help="fixed confidence tau (the controller's start value)")
    model.add_argument("--target-compute", type=_optional_float,
                       help="fraction of token-layers to execute (steers tau); 'none' for a fixed tau")
    model.add_argument("--exit-kv", choices=("keep", "drop"))
    model.add_argument("--exit-warmup-steps", type=int)
    model.add_argument("--exit-criterion", choices=EXIT_CRITERIA,
                       help="prior_margin: distance of a head's log-odds from the replacement prior's; "
                            "confidence: |2p - 1|")
    model.add_argument("--exit-special-tokens", action=argparse.BooleanOptionalAction,
                       help="let [CLS] and [SEP] exit (by default they run every layer)")
    model.add_argument("--aux-weight", type=float, help="the exit heads' share of the discriminator loss, in [0, 1)")
    model.add_argument("--generator", choices=("mlm", "uniform", "unigram"),
                       help="replacements from an MLM generator, or generator-free (uniform / unigram draws); "
                            "at CPU budgets only generator-free discriminators leave the replaced-token prior")
    model.add_argument("--generator-temperature", type=float, help="sample replacements from softmax(logits / T)")
    model.add_argument("--replacement-mix", type=float,
                       help="share of masked positions replaced uniformly instead of by the generator")
    model.add_argument("--replacement-mix-steps", type=int, help="steps over which --replacement-mix falls to 0")
    model.add_argument("--mask-prob", type=float)
    model.add_argument("--disc-weight", type=float)
    model.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any other ElectraExitConfig field (JSON value), repeatable")

    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="URL", help="dataset URL (default: the embedded corpus)")
    data.add_argument("--data-cache-dir")

    training = parser.add_argument_group("optimization")
    training.add_argument("--lr", type=float)
    training.add_argument("--warmup-steps", type=int)
    training.add_argument("--weight-decay", type=float)
    training.add_argument("--grad-clip", type=float)
    training.add_argument("--global-batch-size", type=int)
    training.add_argument("--micro-batch-size", type=int)
    training.add_argument("--precision", choices=PRECISIONS)
    training.add_argument("--max-steps", type=int)
    training.add_argument("--max-tokens", type=int)
    training.add_argument("--max-minutes", type=float)

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (ds_configs/zero{1,2,3}.json)")
    parallel.add_argument("--pipeline-stages", type=int)
    parallel.add_argument("--pipeline-partition", help='layer split across stages: "parameters", "uniform" '
                          'or "type:REGEX" (default: balance discriminator layers)')
    parallel.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                          help="how long a collective waits for a lost peer before the run fails")
    parallel.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", metavar="PATH_OR_URL")
    ckpt.add_argument("--save-interval", type=int)
    ckpt.add_argument("--keep-last", type=int)
    ckpt.add_argument("--resume", metavar="auto|none|PATH")
    ckpt.add_argument("--export-hf", action=argparse.BooleanOptionalAction)
    ckpt.add_argument("--start-over", action="store_true", default=None,
                      help="start a new run in a run directory that holds one, moving the old run aside to "
                           "RUN_DIR.old-TIMESTAMP first (nothing is deleted)")
    ckpt.add_argument("--checkpoint-retries", type=int, metavar="N",
                      help="retries with backoff of each object-store operation of the checkpoint mirror")

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--log-interval", type=int)
    metrics.add_argument("--progress", choices=PROGRESS_MODES)
    metrics.add_argument("--tensorboard", action=argparse.BooleanOptionalAction)
    metrics.add_argument("--csv", action=argparse.BooleanOptionalAction)
    metrics.add_argument("--eval-interval", type=int, help="held-out evaluation every N steps (0: off)")
    metrics.add_argument("--eval-samples", type=int, help="held-out samples per evaluation")
    return parser


def _parse_model_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--model-set {item!r} is invalid; expected FIELD=VALUE.")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def load_config_file(path: str) -> TrainConfig:
    """A saved config.json (the resolved config a run writes, or its "train" part alone); ConfigError
    naming the file when it cannot be read, is not JSON, or a section is not an object."""
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except OSError as error:
        raise ConfigError(f"config={path!r} cannot be read ({error.strerror or error}); "
                          f"expected a config.json a run wrote.") from None
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise ConfigError(f"config={path!r} is not valid JSON ({error}); expected a config.json a run wrote.") from None
    train = saved.get("train", saved) if isinstance(saved, dict) else saved
    if not isinstance(train, dict):
        raise ConfigError(f"config={path!r} holds {json.dumps(train)[:60]} where an object of config sections "
                          f"({', '.join(SECTIONS)}) was expected.")
    for section in SECTIONS:
        if section in train and not isinstance(train[section], dict):
            raise ConfigError(f"config={path!r} has section {section!r} = {json.dumps(train[section])[:60]}; "
                              f"expected an object of its fields.")
    try:
        return TrainConfig.from_dict(train)
    except ConfigError as error:
        raise ConfigError(f"config={path!r} is invalid: {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config={path!r} is invalid: {error}.") from None


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The validated config for a command line; raises ConfigError naming the bad value."""
    args = build_parser().parse_args(argv)
    if args.config:
        config = load_config_file(args.config)
    else:
        config = preset_config(args.preset)
    for dest, (section, name) in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            setattr(getattr(config, section), name, None if dest in NONE_FLAGS and value == _NONE else value)
    overrides = dict(config.model.overrides)
    for name in MODEL_FLAGS:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = None if value == _NONE else value
    overrides.update(_parse_model_set(args.model_set))
    config.model.overrides = overrides
    config.validate()
    return config, args
