"""The command line is generated from the config dataclasses: every field has a flag, the layers
apply in order (defaults < preset < --config file < flags), both DeepSpeed spellings work, and a
DeepSpeed config's disagreements with the trainer are reported together. In process, no launch."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

import pytest

from dsexit.model import ElectraExitConfig
from dsexit.model.config import DATASET_FIELDS
from dsexit.train.config import ConfigError, TrainConfig
from dsexit.train.config.cli import build_parser, dataclass_flags, parse_config
from dsexit.train.config.ds_config import load_ds_config, resolve_ds_config
from tests.helpers import REPO


def test_every_config_field_has_a_flag_with_its_docstring_as_help():
    parser, flags = build_parser()
    dests = {flag.dest for flag in flags}
    for section in dataclasses.fields(TrainConfig):
        for item in dataclasses.fields(section.default_factory()):
            assert f"{section.name}.{item.name}" in dests
    for item in dataclasses.fields(ElectraExitConfig):
        assert (f"model.overrides.{item.name}" in dests) is (item.name not in DATASET_FIELDS)
    text = " ".join(parser.format_help().split())
    for section in dataclasses.fields(TrainConfig):
        assert f"\n{section.name}:\n" in parser.format_help()  # one argument group per section
    assert "--lr X Peak learning rate. (default: 0.002)" in text  # the docstring, and the smoke preset's value
    assert "--exit-kv {keep,drop} Exited tokens stay visible as keys and values" in text


def test_a_new_field_gets_a_flag_with_no_other_edit():
    @dataclass
    class Throwaway:
        """A section someone just wrote."""

        beam_width: int = 4
        """Beams kept per step."""
        temperature: float | None = None
        """Softmax temperature; none: greedy."""
        tracing: bool = False
        label: str = field(default="x", metadata={"flag": "--name", "choices": ("x", "y")})
        extra: dict = field(default_factory=dict)

    parser = argparse.ArgumentParser()
    flags = dataclass_flags(parser.add_argument_group("throwaway"), Throwaway, "throwaway", Throwaway())
    assert [flag.option for flag in flags] == ["--beam-width", "--temperature", "--tracing", "--name", "--extra"]
    args = parser.parse_args(
        ["--beam-width", "8", "--temperature", "none", "--no-tracing", "--name", "y", "--extra", "a=1"]
    )
    assert (
        getattr(args, "throwaway.beam_width"),
        repr(getattr(args, "throwaway.temperature")),
        getattr(args, "throwaway.tracing"),
        getattr(args, "throwaway.label"),
    ) == (8, "none", False, "y")
    assert getattr(args, "throwaway.extra") == ["a=1"]
    assert "Beams kept per step. (default: 4)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "z"])


def test_layers_apply_in_order_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "train": {
                    "job": {"preset": "small"},
                    "optim": {"lr": 1e-4, "weight_decay": 0.02},
                    "model": {"overrides": {"exit_kv": "drop", "mask_prob": 0.2}},
                }
            }
        )
    )
    config, _ = parse_config(
        ["--config", str(path), "--lr", "3e-4", "--mask-prob", "0.1", "--model-set", "aux_weight=0.25"]
    )
    assert config.optim.lr == 3e-4  # flag over file
    assert config.optim.weight_decay == 0.02  # file over preset and default
    assert (config.job.preset, config.training.micro_batch_size, config.model.preset) == ("small", 128, "electra-small")
    assert config.metrics.eval_batch_size == 64  # default: set by no layer
    assert config.model.overrides == {"exit_kv": "drop", "mask_prob": 0.1, "aux_weight": 0.25}  # merged by key
    config, _ = parse_config(["--config", str(path), "--preset", "smoke"])
    assert (config.job.preset, config.training.micro_batch_size, config.optim.lr) == ("smoke", 16, 1e-4)
    config, _ = parse_config(["--preset", "small"])
    assert (config.optim.lr, config.optim.weight_decay) == (5e-4, 0.01)  # preset over default, default below


def test_existing_spellings_keep_working():
    config, args = parse_config(
        [
            "--no-exit",
            "--target-compute",
            "none",
            "--resume",
            "none",
            "--max-steps",
            "none",
            "--max-tokens",
            "4096",
            "--no-export-hf",
            "--no-tensorboard",
            "--start-over",
            "--local_rank",
            "3",
            "--exit-warmup-steps",
            "5",
            "--data-cache-dir",
            "none",
            "--model-set",
            "exit_kv=drop",
            "--exit-kv",
            "keep",
        ]
    )
    assert config.model.overrides == {
        "generator_temperature": 2.0,
        "exit_enabled": False,
        "exit_kv": "drop",
    }  # the preset, then --model-set last
    assert config.exit_control.target_compute is None and config.checkpoint.resume == "none"
    assert (config.training.max_steps, config.training.max_tokens) == (None, 4096)
    checkpoint = config.checkpoint
    assert (checkpoint.export_hf, config.metrics.tensorboard, checkpoint.start_over) == (False, False, True)
    assert (config.exit_control.warmup_steps, config.data.cache_dir, args.local_rank) == (5, "none", 3)


def test_both_deepspeed_spellings():
    ours, _ = parse_config(["--deepspeed", "ds_configs/zero3.json"])
    theirs, _ = parse_config(["--deepspeed", "--deepspeed_config", "ds_configs/zero3.json"])
    assert ours.parallelism.deepspeed_config == theirs.parallelism.deepspeed_config == "ds_configs/zero3.json"
    bare, _ = parse_config(["--deepspeed"])
    assert bare.parallelism.deepspeed_config == TrainConfig().parallelism.deepspeed_config
    with pytest.raises(ConfigError, match="'zero1.json' and --deepspeed_config 'zero3.json' disagree"):
        parse_config(["--deepspeed", "zero1.json", "--deepspeed_config", "zero3.json"])


def test_every_deepspeed_mismatch_is_reported_at_once(tmp_path):
    config, _ = parse_config(["--run-dir", str(tmp_path)])
    raw = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    raw.update(train_batch_size=64, gradient_clipping=5.0)
    raw["optimizer"]["params"]["lr"] = 0.1
    with pytest.raises(ConfigError) as caught:
        resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))
    message = str(caught.value)
    for mismatch in (
        "train_batch_size=64 but the trainer has global_batch_size=32",
        "gradient_clipping=5.0 but the trainer has grad_clip=1.0",
        "optimizer.params.lr=0.1 but the trainer has lr=0.002",
    ):
        assert mismatch in message
    assert len(message.splitlines()) == 1


def test_the_model_config_is_built_once_with_room_for_the_dataset_length():
    config, _ = parse_config([])
    assert config.model.build({}, seq_len=256).max_position_embeddings == 256  # electra-tiny has 128
    config, _ = parse_config(["--max-position-embeddings", "512"])
    assert config.model.build({}, seq_len=256).max_position_embeddings == 512
