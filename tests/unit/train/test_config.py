"""Configuration: presets, flags, validation, DeepSpeed JSON resolution - in process, no launch.

Every user error must be one ConfigError naming the bad value, raised before any
process group exists (tests/integration/train/test_user_errors.py checks that through the real entry point).
"""

from __future__ import annotations

import copy
import json

import pytest

from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.config import ConfigError, preset_config
from dsexit.train.config.cli import parse_config
from dsexit.train.config.ds_config import bf16_supported, check_parallelism, load_ds_config, resolve_ds_config
from dsexit.train.config.resolve import resolve_run
from dsexit.train.config.train_config import ExitControlConfig
from tests.helpers import REPO

SINGLE = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


def _world(size: int) -> WorldInfo:
    return WorldInfo(rank=0, world_size=size, local_rank=0, local_world_size=size, launcher="env")


def _resolve(argv: list[str], world: WorldInfo = SINGLE):
    config, _ = parse_config(argv)
    return resolve_run(config, world, threads=1)


def test_no_arguments_give_the_smoke_preset_on_the_embedded_corpus(tmp_path):
    run = _resolve(["--run-dir", str(tmp_path)])
    assert run.config.job.preset == "smoke" and run.model_config.num_hidden_layers == 4
    assert run.dataset.num_samples > 10_000 and run.model_config.vocab_size == run.dataset.vocab_size
    assert run.ds_config["zero_optimization"]["stage"] == 2
    assert run.ds_config["bf16"]["enabled"] is bf16_supported()
    scheduler = run.ds_config["scheduler"]["params"]
    assert scheduler["total_num_steps"] == run.total_steps == run.config.training.max_steps
    assert scheduler["warmup_num_steps"] == run.total_steps // 10
    assert "auto" not in json.dumps(run.ds_config)


def test_the_smoke_preset_is_the_measured_recipe_and_flags_still_override_it(tmp_path):
    """bench/README.md, "Smoke preset": an MLM generator sampled at temperature 2, 800 steps."""
    run = _resolve(["--run-dir", str(tmp_path)])
    model = run.model_config
    assert (model.generator, model.generator_temperature, model.hidden_size, model.generator_hidden_size) == (
        "mlm",
        2.0,
        64,
        32,
    )
    assert (run.total_steps, run.config.optim.lr, run.config.training.global_batch_size) == (800, 2e-3, 32)
    assert (run.config.exit_control.warmup_steps, run.config.exit_control.target_compute) == (200, 0.7)
    assert run.config.exit_control.min_confidence == ExitControlConfig().min_confidence
    other = _resolve(["--run-dir", str(tmp_path), "--generator-temperature", "1", "--model-set", "exit_kv=drop"])
    assert (other.model_config.generator_temperature, other.model_config.exit_kv) == (1.0, "drop")


def test_flags_reach_their_fields_and_model_overrides(tmp_path):
    run = _resolve(
        [
            "--run-dir",
            str(tmp_path),
            "--model",
            "electra-small",
            "--target-compute",
            "none",
            "--exit-threshold",
            "0.8",
            "--exit-kv",
            "drop",
            "--model-set",
            "hidden_dropout_prob=0.0",
            "--lr",
            "3e-4",
            "--grad-clip",
            "0.5",
            "--precision",
            "fp32",
            "--max-tokens",
            "40960",
        ]
    )
    model = run.model_config
    assert (model.hidden_size, model.exit_threshold, model.exit_kv) == (256, 0.8, "drop")
    assert run.config.exit_control.target_compute is None
    assert model.hidden_dropout_prob == 0.0
    assert run.ds_config["optimizer"]["params"]["lr"] == 3e-4 == run.ds_config["scheduler"]["params"]["warmup_max_lr"]
    assert run.ds_config["gradient_clipping"] == 0.5 and run.ds_config["bf16"]["enabled"] is False
    assert run.total_steps == 10  # 40960 tokens / (32 samples x 128 tokens)


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--exit-threshold", "1.5"], "exit_threshold=1.5"),
        (["--target-compute", "1.2"], "target_compute=1.2"),
        (["--exit-warmup-steps", "-1"], "exit_warmup_steps=-1"),
        (["--min-confidence", "1.0"], "min_confidence=1.0"),
        (["--min-confidence", "-0.1"], "min_confidence=-0.1"),
        (["--capacity-interval", "0"], "capacity_interval=0"),
        (
            ["--exit-routing", "capacity", "--target-compute", "none"],
            "target_compute=None is invalid with exit_routing",
        ),
        (
            ["--exit-routing", "random", "--pipeline-stages", "2", "--deepspeed", "ds_configs/pipeline.json"],
            "exit_routing='random' is invalid with pipeline_stages=2",
        ),
        (["--global-batch-size", "30"], "global_batch_size=30"),
        (["--model", "electra-huge"], "model='electra-huge'"),
        (["--model-set", "no_such_field=1"], "no_such_field"),
        (["--max-steps", "0"], "max_steps=0"),
        (["--warmup-steps", "2000"], "warmup_steps=2000"),
        (["--lr", "-1"], "lr=-1.0"),
        (["--heartbeat-timeout", "-5"], "heartbeat_timeout_s=-5.0"),
        (["--dist-timeout", "0"], "dist_timeout_s=0.0"),
        (["--data", "/nonexistent/dataset"], "/nonexistent/dataset"),
        (["--deepspeed", "ds_configs/zero9.json"], "zero9.json"),
        (["--resume", "/nonexistent/checkpoints"], "resume='/nonexistent/checkpoints'"),
        (["--resume", "s3://bucket/run/global_step10"], "--checkpoint-dir URL --resume auto"),
    ],
)
def test_bad_values_raise_one_error_naming_them(argv, names, tmp_path):
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace("[", r"\[")):
        _resolve(["--run-dir", str(tmp_path), *argv])


def test_a_bad_compile_choice_in_a_config_file_is_one_error_naming_it(tmp_path):
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"training": {"compile": "sometimes"}}))
    with pytest.raises(ConfigError, match="compile='sometimes'"):
        _resolve(["--run-dir", str(tmp_path / "run"), "--config", str(saved)])


def test_a_config_saved_with_controller_settings_in_the_model_overrides_still_loads(tmp_path):
    saved = preset_config("smoke").to_dict()
    del saved["exit_control"]
    saved["model"]["overrides"] = {"exit_warmup_steps": 7, "target_compute": 0.4, "exit_kv": "drop"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": saved}))
    config, _ = parse_config(["--config", str(path), "--run-dir", str(tmp_path)])
    assert (config.exit_control.warmup_steps, config.exit_control.target_compute) == (7, 0.4)
    assert config.model.overrides == {"generator_temperature": 2.0, "exit_kv": "drop"}  # the preset's, then the file's


def test_batch_sizes_must_factor_over_the_data_parallel_size(tmp_path):
    with pytest.raises(ConfigError, match="train_batch_size must equal micro_batch_size x gradient_accumulation_steps"):
        _resolve(["--run-dir", str(tmp_path), "--global-batch-size", "32", "--micro-batch-size", "16"], _world(3))
    run = _resolve(["--run-dir", str(tmp_path), "--global-batch-size", "32", "--micro-batch-size", "8"], _world(2))
    assert (
        run.ds_config["train_batch_size"],
        run.ds_config["train_micro_batch_size_per_gpu"],
        run.ds_config["gradient_accumulation_steps"],
    ) == (32, 8, 2)


def test_concrete_deepspeed_values_must_agree_with_the_trainer(tmp_path):
    config, _ = parse_config(["--run-dir", str(tmp_path)])
    raw = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    raw["train_batch_size"] = 64
    with pytest.raises(ConfigError, match="train_batch_size=64 but the trainer has global_batch_size=32"):
        resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))
    raw = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))
    raw = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    raw["fp16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))


@pytest.mark.parametrize(
    "change, names",
    [
        ({"no_such_key": 1}, ["'no_such_key'", "does not read"]),  # DeepSpeed itself ignores it
        ({"zero_optimization": {"stage": 2, "stagee": 2}}, ["'stagee'", "Extra inputs are not permitted"]),
        ({"zero_optimization": {"stage": 2, "overlap_comm": "maybe"}}, ["'overlap_comm'", "'maybe'"]),
        ({"optimizer": {"type": "NoSuchOpt", "params": {"lr": "auto"}}}, ["optimizer.type='NoSuchOpt'", "AdamW"]),
    ],
)
def test_what_the_installed_deepspeed_would_refuse_or_ignore_is_one_error_naming_it(change, names, tmp_path):
    config, _ = parse_config(["--run-dir", str(tmp_path)])
    raw = {**load_ds_config(str(REPO / "ds_configs" / "zero2.json")), **change}
    with pytest.raises(ConfigError) as raised:
        resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_torch_optimizers_and_every_shipped_config_pass_deepspeed_s_own_parser(tmp_path):
    config, _ = parse_config(["--run-dir", str(tmp_path)])
    for name in ("zero1.json", "zero2.json", "zero3.json", "pipeline.json"):
        raw = load_ds_config(str(REPO / "ds_configs" / name))
        resolve_ds_config(raw, config, dp_size=2, total_steps=100, monitor_dir=str(tmp_path))
    raw = {**load_ds_config(str(REPO / "ds_configs" / "zero2.json")), "optimizer": {"type": "SGD", "params": {}}}
    resolve_ds_config(raw, config, dp_size=1, total_steps=100, monitor_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_data_parallel_configs_resolve_completely(name, tmp_path):
    run = _resolve(["--run-dir", str(tmp_path), "--deepspeed", f"ds_configs/{name}"], _world(2))
    assert run.zero_stage == int(name[4]) and "auto" not in json.dumps(run.ds_config)
    assert run.ds_config["tensorboard"]["output_path"].startswith(str(tmp_path))
    # DeepSpeed's throughput timer synchronises the device twice per micro-batch when on
    assert run.ds_config["timers"]["throughput"] == {"enabled": False, "synchronized": False}


def test_parallelism_matrix():
    pipeline = load_ds_config(str(REPO / "ds_configs" / "pipeline.json"))
    zero2 = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    with pytest.raises(ConfigError, match="supported combinations: data parallel with ZeRO 0, 1, 2 or 3"):
        check_parallelism(zero2, 2, "ds_configs/zero2.json")
    with pytest.raises(ConfigError, match="pass --pipeline-stages N"):
        check_parallelism(pipeline, 1, "ds_configs/pipeline.json")
    assert pipeline["zero_optimization"]["stage"] == 1
    check_parallelism(pipeline, 2, "ds_configs/pipeline.json")  # the supported pipeline combination


def test_pipeline_partition_is_checked_and_reaches_the_config():
    from dsexit.train.config.cli import parse_config

    config, _ = parse_config(["--pipeline-partition", "parameters"])
    assert config.parallelism.pipeline_partition == "parameters"
    with pytest.raises(ConfigError, match="pipeline_partition='by-size'"):
        parse_config(["--pipeline-partition", "by-size"])


def test_resolution_returns_a_new_config_and_leaves_the_users_as_it_was(tmp_path):
    config, _ = parse_config(
        ["--run-dir", str(tmp_path), "--deepspeed", "pipeline.json", "--pipeline-stages", "2"]
        + ["--pipeline-partition", "layers: 1, 3"]
    )
    given = copy.deepcopy(config)
    run = resolve_run(config, _world(2), threads=1)
    assert config == given  # resolution edits nothing the caller holds
    assert run.config.parallelism.deepspeed_config == str(REPO / "dsexit/train/config/ds_configs/pipeline.json")
    assert run.config.parallelism.pipeline_partition == "layers:1,3"
    assert run.run_plan is not None and run.run_plan.mode == "new"
