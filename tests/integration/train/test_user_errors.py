"""Every user error is one line on stderr, exit code 2, before any work starts: nothing written.

Table-driven: each case is a command line of launch/pretrain.py, launch/export_hf.py or
launch/finetune.py, run as a real process, with the text its one line must contain (the
value the user gave) and text it must not contain (a credential). The checkpoint cases
damage a copy of a real run's checkpoint (the session's ZeRO-2 run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import ENV, REPO, ZERO2_ARGS

PRETRAIN = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--model", "electra-tiny"]
EXPORT = [sys.executable, str(REPO / "launch" / "export_hf.py")]
FINETUNE = [sys.executable, str(REPO / "launch" / "finetune.py")]
# No credentials from anywhere, and no network: S3 goes to a closed local port, no metadata service.
NO_AWS = {name: value for name, value in ENV.items() if not name.startswith("AWS_")} | {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Case:
    command: list[str]
    names: list[str]  # each must appear in the one line
    written: list[Path] = field(default_factory=list)  # must not exist afterwards
    secret: str | None = None  # must appear nowhere in the output
    env: dict = field(default_factory=lambda: dict(ENV))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damaged_dataset(root: Path, damage) -> tuple[Path, dict[str, str]]:
    """A copy of the embedded dataset with `damage(path)` applied to every training shard;
    returns it and {shard name: sha256 index.json lists}."""
    from dsexit.data import DEFAULT_DATA_URL

    shutil.copytree(DEFAULT_DATA_URL, root)
    listed = {shard["name"]: shard["sha256"] for shard in json.loads((root / "index.json").read_text())["shards"]}
    for name in listed:
        damage(root / name)
    return root, listed


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _tiny_export(directory: Path) -> Path:
    import torch
    from transformers import ElectraConfig, ElectraForPreTraining

    from dsexit.data import DEFAULT_DATA_URL, save_hf_tokenizer

    torch.manual_seed(0)
    config = ElectraConfig(
        vocab_size=30522,
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    ElectraForPreTraining(config).save_pretrained(directory)
    save_hf_tokenizer(DEFAULT_DATA_URL, str(directory))
    return directory


def _task(directory: Path) -> Path:
    directory.mkdir()
    for split in ("train", "dev", "test"):
        (directory / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"text": text, "label": label}) + "\n"
                for text, label in (("good fine", 1), ("bad awful", 0)) * 4
            )
        )
    return directory


def _run(case: Case) -> tuple[int, list[str], str]:
    result = subprocess.run(case.command, cwd=REPO, env=case.env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, lines, result.stdout + result.stderr


def _check(case: Case, ran: tuple[int, list[str], str] | None = None) -> None:
    """`case` run (or its run `ran` already made), checked: exit 2, one line naming every name, nothing written."""
    code, lines, output = ran or _run(case)
    assert code == 2, f"exit {code}, expected 2:\n{output[-3000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{output[-3000:]}"
    for name in case.names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    if case.secret:
        assert case.secret not in output, f"the credential {case.secret!r} was printed: {output}"
    for path in case.written:
        assert not path.exists(), f"{path} was written by a start that failed"


PRETRAIN_CASES = [
    "zero_stage_two",
    "config_malformed",
    "config_missing",
    "config_section_not_object",
    "config_not_object",
    "config_keys_not_sections",
    "data_unknown_protocol",
    "data_gs_without_gcsfs",
    "data_s3_without_credentials",
    "data_s3_credentials_in_url",
    "shard_flipped",
    "shard_truncated",
    "tokenizer_file_gone",
    "capacity_routing_with_pipeline",
]


@pytest.mark.parametrize("name", PRETRAIN_CASES)
def test_pretrain_user_error_is_one_line_exit_2_nothing_written(name, tmp_path):
    run_dir = tmp_path / "run"
    base = [*PRETRAIN, "--run-dir", str(run_dir), "--max-steps", "2"]
    written = [run_dir]
    if name == "zero_stage_two":
        config = tmp_path / "zero.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": "two"}}))
        case = Case([*base, "--deepspeed", str(config)], [str(config), "zero_optimization.stage='two'"], written)
    elif name.startswith("config_"):
        config = tmp_path / "config.json"
        config.write_text(
            {
                "config_malformed": '{"train": {"job": ',
                "config_missing": "",
                "config_section_not_object": json.dumps({"train": {"optim": [1, 2]}}),
                "config_not_object": "[1, 2]",
                "config_keys_not_sections": json.dumps({"max_steps": "ten"}),
            }[name]
        )
        if name == "config_missing":
            config.unlink()
        named = {
            "config_section_not_object": "'optim'",
            "config_not_object": "[1, 2]",
            "config_keys_not_sections": "'max_steps'",
        }.get(name, "config=")
        case = Case([*base, "--config", str(config)], [str(config), named], written)
    elif name == "data_unknown_protocol":
        case = Case([*base, "--data", "foo://x"], ["foo://x", "'foo'"], written)
    elif name == "data_gs_without_gcsfs":
        import importlib.util

        if importlib.util.find_spec("gcsfs") is not None:
            pytest.skip("gcsfs is installed here")
        case = Case([*base, "--data", "gs://bucket/data"], ["gs://bucket/data", "gcsfs"], written)
    elif name == "data_s3_without_credentials":
        case = Case([*base, "--data", "s3://bucket/data"], ["s3://bucket/data", "credentials"], written, env=NO_AWS)
    elif name == "data_s3_credentials_in_url":
        case = Case(
            [*base, "--data", "s3://AKIDEXAMPLE:s3cr3tVALUE@bucket/data"],
            ["s3://***@bucket/data"],
            written,
            secret="s3cr3tVALUE",
            env=NO_AWS,
        )
    elif name == "tokenizer_file_gone":  # the export at the end needs it: refused before step 1
        data, _ = _damaged_dataset(tmp_path / "data", lambda shard: None)
        (data / "vocab.txt").unlink()
        case = Case([*base, "--data", str(data)], [str(data / "vocab.txt"), "--no-export-hf"], written)
    elif name == "capacity_routing_with_pipeline":
        pipeline = ["--exit-routing", "capacity", "--pipeline-stages", "2", "--deepspeed", "ds_configs/pipeline.json"]
        case = Case([*base, *pipeline], ["exit_routing='capacity'", "pipeline_stages=2"], written)
    else:
        data, listed = _damaged_dataset(tmp_path / "data", _flip_byte if name == "shard_flipped" else _truncate)
        ran = _run(Case([*base, "--data", str(data)], []))
        code, lines, output = ran
        assert code == 2 and len(lines) == 1, output[-3000:]
        shard = next(shard for shard in listed if f"{data / shard} " in lines[0])  # which shard it names
        case = Case([*base, "--data", str(data)], [str(data / shard), listed[shard], _sha256(data / shard)], written)
        _check(case, ran)
        return
    _check(case)


@pytest.fixture(scope="module")
def damaged_checkpoints(zero2_straight, tmp_path_factory) -> dict[str, Path]:
    """Copies of the run's step-20 checkpoint root: one missing its model states, one truncated."""
    copies = {}
    for kind in ("missing", "truncated"):
        root = tmp_path_factory.mktemp(f"checkpoint_{kind}")
        shutil.copytree(zero2_straight.checkpoints / "global_step20", root / "global_step20")
        shutil.copy(zero2_straight.checkpoints / "latest", root / "latest")
        states = root / "global_step20" / "mp_rank_00_model_states.pt"
        if kind == "missing":
            states.unlink()
        else:
            states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
        copies[kind] = root / "global_step20"
    return copies


def test_resuming_onto_another_dataset_is_one_line_before_deepspeed_loads(zero2_straight, tmp_path):
    """Same shapes, other content: one shard's bytes differ (its digest updated in index.json)."""
    data, _ = _damaged_dataset(tmp_path / "data", lambda shard: None)
    index = json.loads((data / "index.json").read_text())
    first = data / index["shards"][0]["name"]
    _flip_byte(first)
    index["shards"][0]["sha256"] = _sha256(first)
    (data / "index.json").write_text(json.dumps(index))
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_straight.run_dir, run_dir)
    files = lambda: {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}  # noqa: E731
    before = files()
    command = [sys.executable, str(REPO / "launch" / "pretrain.py"), *ZERO2_ARGS, "--max-steps", "30"]
    command += ["--run-dir", str(run_dir), "--resume", "auto", "--data", str(data), "--no-export-hf"]
    _check(Case(command, [str(run_dir / "checkpoints" / "global_step20"), "dataset_fingerprint"]))
    assert files() == before


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_export_hf_damaged_weights_one_line(damaged_checkpoints, kind, tmp_path):
    out = tmp_path / "hf"
    _check(Case([*EXPORT, str(damaged_checkpoints[kind]), str(out)], [str(damaged_checkpoints[kind])], [out]))


def test_export_hf_output_path_is_a_file(zero2_straight, tmp_path):
    out = tmp_path / "hf"
    out.write_text("a file the user keeps")
    _check(Case([*EXPORT, str(zero2_straight.checkpoints / "global_step20"), str(out)], [str(out), "is a file"]))
    assert out.read_text() == "a file the user keeps"


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_finetune_damaged_weights_one_line(kind, tmp_path):
    export = _tiny_export(tmp_path / "export")
    weights = export / "model.safetensors"
    if kind == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "result.json"
    _check(
        Case(
            [*FINETUNE, "--model", str(export), "--task", str(_task(tmp_path / "task")), "--out", str(out)],
            [str(export)],
            [out],
        )
    )


def test_finetune_damaged_checkpoint_one_line(damaged_checkpoints, tmp_path):
    out, export_dir = tmp_path / "result.json", tmp_path / "export"
    _check(
        Case(
            [
                *FINETUNE,
                "--model",
                str(damaged_checkpoints["truncated"]),
                "--task",
                str(_task(tmp_path / "task")),
                "--export-dir",
                str(export_dir),
                "--out",
                str(out),
            ],
            [str(damaged_checkpoints["truncated"])],
            [out, export_dir],
        )
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="the entrypoint is a bash script")
@pytest.mark.parametrize(
    "variable, value",
    [
        ("NNODES", "two"),
        ("NODE_RANK", "2"),
        ("NPROC_PER_NODE", "1.5"),
        ("MASTER_PORT", "70000"),
        ("NNODES", "0"),
        ("MASTER_ADDR_WAIT", "soon"),
        ("NNODES", "2:1"),
        ("NNODES", "0:2"),
        ("NNODES", "1:two"),
        ("MAX_RESTARTS", "-1"),
    ],
)
def test_entrypoint_rejects_non_integer_layout(variable, value, tmp_path):
    nodes = "1:2" if variable == "MAX_RESTARTS" else "2"  # restarts belong to an elastic job
    env = {**ENV, "NNODES": nodes, "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", variable: value}
    if variable != "NPROC_PER_NODE":
        env["NPROC_PER_NODE"] = "1"
    _check(
        Case(
            [str(REPO / "docker" / "entrypoint.sh"), "--run-dir", str(tmp_path / "run")],
            [f"{variable}='{value}'"],
            [tmp_path / "run"],
            env=env,
        )
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="the entrypoint is a bash script")
def test_entrypoint_waits_a_bounded_time_for_an_unresolvable_master_addr(tmp_path):
    env = {**ENV, "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "1"}
    env.update(MASTER_ADDR="node0.invalid", MASTER_ADDR_WAIT="2")  # .invalid never resolves (RFC 2606)
    _check(
        Case(
            [str(REPO / "docker" / "entrypoint.sh"), "--run-dir", str(tmp_path / "run")],
            ["MASTER_ADDR='node0.invalid' did not resolve", "within 2s"],
            [tmp_path / "run"],
            env=env,
        )
    )
    assert os.listdir(tmp_path) == []


def test_pipeline_with_zero3_fails_before_any_process_group(tmp_path):
    result = subprocess.run(
        [
            *PRETRAIN,
            "--deepspeed",
            "ds_configs/zero3.json",
            "--pipeline-stages",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(errors) == 1 and "ZeRO stage 3" in errors[0] and "pipeline parallel" in errors[0]
    assert not (tmp_path / "run").exists()  # nothing was started


class _Payload:
    """Unpickling it creates `path`: stands for code planted in a checkpoint file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def planted_run(zero2_straight, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose step-20 marker lost its digests and whose model states hold a payload;
    returns (the run directory, the file the payload would create)."""
    import pickle

    run_dir, ran = tmp_path / "planted", tmp_path / "payload-ran"
    shutil.copytree(zero2_straight.run_dir, run_dir)
    step = run_dir / "checkpoints" / "global_step20"
    marker = json.loads((step / "dsexit_checkpoint.json").read_text())
    del marker["files"]
    (step / "dsexit_checkpoint.json").write_text(json.dumps(marker))
    for states in step.glob("*model_states.pt"):
        states.write_bytes(pickle.dumps(_Payload(ran), protocol=2))
    return run_dir, ran


@pytest.mark.parametrize("route", ["resume", "export", "finetune"])
def test_a_marker_without_digests_is_refused_and_its_payload_never_runs(planted_run, route, tmp_path):
    run_dir, ran = planted_run
    step = run_dir / "checkpoints" / "global_step20"
    out = tmp_path / "out"
    command = {
        "resume": [*PRETRAIN[:2], *ZERO2_ARGS, "--max-steps", "30", "--run-dir", str(run_dir), "--no-export-hf"],
        "export": [*EXPORT, str(step), str(out)],
        "finetune": [*FINETUNE, "--model", str(step), "--task", str(_task(tmp_path / "task")), "--out", str(out)],
    }[route]
    _check(Case(command, [str(step), "no file digests", "--trust-unverified-checkpoint"], [out]))
    assert not ran.exists()


def test_trusting_an_unverified_checkpoint_is_explicit_and_then_it_is_unpickled(planted_run, tmp_path):
    """The control: the planted payload is live, so the refusals above are what kept it from running."""
    run_dir, ran = planted_run
    step = run_dir / "checkpoints" / "global_step20"
    subprocess.run([*EXPORT, str(step), str(tmp_path / "out"), "--trust-unverified-checkpoint"], cwd=REPO, env=ENV)
    assert ran.exists()
