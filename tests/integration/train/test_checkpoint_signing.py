"""A signed run's checkpoints cannot be forged by someone who can only write the store, with real processes.

A run trains with a key file (DSEXIT_CHECKPOINT_KEY_FILE); then an adversary with write access
plants a pickle that would create a file when unpickled, and writes a marker with the planted file's
true digest (what anyone can compute) through every route that opens checkpoint files: `--resume
auto` on the run directory, the export, fine-tuning, the universal conversion a resume at another
world size loads, and an S3 mirror (a real moto server) a fresh directory resumes from. Each is
refused in one line (exit 2) and the payload never runs; the control at the end shows the payload is
live. `latest` pointed back past a signed step is refused too, and naming the step rolls back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .helpers import ENV, REPO, TINY, launch
from .test_object_store import _s3_env
from .test_run_identity import errors, without
from .test_user_errors import EXPORT, FINETUNE, _task

KEY_ENV = "DSEXIT_CHECKPOINT_KEY_FILE"
ARGS = [
    *without(TINY, "--warmup-steps"),
    "--max-steps",
    "4",
    "--save-interval",
    "2",
    "--keep-last",
    "3",
    "--eval-interval",
    "0",
    "--no-export-hf",
]


class _Payload:
    """Unpickling it creates `path`: stands for code planted in a checkpoint file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def key_env(tmp_path_factory) -> dict:
    key = tmp_path_factory.mktemp("key") / "checkpoint.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    return {KEY_ENV: str(key)}


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory, key_env):
    return launch("python", tmp_path_factory.mktemp("signed") / "run", ARGS, nproc=1, env=key_env).check()


def _forge(step: Path, ran: Path) -> None:
    """What write access allows: the model states replaced by a payload, the marker's digest of it
    recomputed, and the marker signed with a key of the adversary's own."""
    states = step / "mp_rank_00_model_states.pt"
    states.write_bytes(pickle.dumps(_Payload(ran), protocol=2))
    marker = json.loads((step / "dsexit_checkpoint.json").read_text())
    marker["files"][states.name] = {
        "sha256": hashlib.sha256(states.read_bytes()).hexdigest(),
        "bytes": states.stat().st_size,
    }
    marker["key_id"], marker["signature"] = "0123456789abcdef", "0" * 64
    (step / "dsexit_checkpoint.json").write_text(json.dumps(marker))


@pytest.fixture
def forged(signed_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the signed run whose newest step is forged; (the run directory, the payload's trace)."""
    run_dir, ran = tmp_path / "forged", tmp_path / "payload-ran"
    shutil.copytree(signed_run.run_dir, run_dir)
    _forge(run_dir / "checkpoints" / "global_step4", ran)
    return run_dir, ran


def _refused(command: list[str], env: dict, *names: str) -> None:
    result = subprocess.run(command, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
    assert len(lines) == 1, f"expected one line:\n{result.stderr[-3000:]}"
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


@pytest.mark.parametrize("route", ["resume", "export", "finetune"])
def test_a_forged_marker_is_refused_on_every_route_and_its_payload_never_runs(forged, key_env, route, tmp_path):
    run_dir, ran = forged
    step = run_dir / "checkpoints" / "global_step4"
    out = tmp_path / "out"
    if route == "resume":
        refused = launch("python", run_dir, [*ARGS, "--max-steps", "6"], nproc=1, env=key_env)
        assert refused.returncode == 2, refused.output[-3000:]
        [line] = errors(refused.output)
        assert str(step) in line and "signed with key" in line
    else:
        command = {
            "export": [*EXPORT, str(step), str(out)],
            "finetune": [*FINETUNE, "--model", str(step), "--task", str(_task(tmp_path / "task")), "--out", str(out)],
        }[route]
        _refused(command, key_env, str(step), "signed with key")
        assert not out.exists()
    assert not ran.exists()


def test_latest_pointed_back_past_a_signed_step_is_refused_and_naming_the_step_rolls_back(
    signed_run, key_env, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(signed_run.run_dir, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("global_step2")
    refused = launch("python", run_dir, [*ARGS, "--max-steps", "6"], nproc=1, env=key_env)
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = errors(refused.output)
    assert "names global_step2, older than global_step4" in line

    named = str(run_dir / "checkpoints" / "global_step2")
    rolled = launch("python", run_dir, [*ARGS, "--max-steps", "3", "--resume", named], nproc=1, env=key_env).check()
    assert max(rolled.metrics) == 3 and "rolled back" in rolled.output.lower()
    assert next((run_dir / "checkpoints").glob("rolled-back-*/global_step4"))  # the newer step kept aside


def test_a_planted_universal_conversion_is_refused_before_the_engine_opens_it(signed_run, key_env, tmp_path):
    run_dir, ran = tmp_path / "run", tmp_path / "payload-ran"
    shutil.copytree(signed_run.run_dir, run_dir)
    planted = run_dir / "checkpoints" / "universal" / "global_step4"
    planted.mkdir(parents=True)
    (planted / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Payload(ran), protocol=2))
    (planted / "dsexit_universal_done").write_text("global_step4")  # what a conversion left before digests
    # saved by one process, resumed by two: the engine would load universal/global_step4
    refused = launch("deepspeed", run_dir, [*ARGS, "--max-steps", "6"], nproc=2, env=key_env)
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = errors(refused.output)
    assert "universal conversion" in line and str(planted) in line and "Traceback" not in refused.output
    assert not ran.exists()


def test_a_forged_step_on_the_s3_mirror_is_refused_in_a_fresh_directory(s3_server, key_env, tmp_path):
    import s3fs

    key_id, secret = f"AKID{uuid.uuid4().hex[:12].upper()}", f"secret-{uuid.uuid4().hex}"
    env = {**_s3_env(s3_server.endpoint, key_id, secret), **key_env}
    bucket = f"signed-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(key=key_id, secret=secret, client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir(bucket)
    url = f"s3://{bucket}/run"
    launch("python", tmp_path / "first", [*ARGS, "--checkpoint-dir", url], nproc=1, env=env).check()

    # the adversary copies step 4 to a newer step on the mirror, forges it and points `latest` at it
    ran, local = tmp_path / "payload-ran", tmp_path / "global_step6"
    fs.get(f"{bucket}/run/global_step4", str(local), recursive=True)
    _forge(local, ran)
    marker = json.loads((local / "dsexit_checkpoint.json").read_text())
    (local / "dsexit_checkpoint.json").write_text(json.dumps({**marker, "step": 6, "tag": "global_step6"}))
    fs.put(str(local), f"{bucket}/run/global_step6", recursive=True)
    fs.pipe(f"{bucket}/run/latest", b"global_step6")

    refused = launch(
        "python", tmp_path / "second", [*ARGS, "--max-steps", "8", "--checkpoint-dir", url], nproc=1, env=env
    )
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = errors(refused.output)
    assert "global_step6" in line and "signed with key" in line and secret not in refused.output
    assert not ran.exists()


def test_the_control_trusting_an_unsigned_step_unpickles_it(forged, key_env, tmp_path):
    """The payload is live: the refusals above are what kept it from running."""
    run_dir, ran = forged
    step = run_dir / "checkpoints" / "global_step4"
    marker = json.loads((step / "dsexit_checkpoint.json").read_text())
    del marker["signature"], marker["key_id"]
    (step / "dsexit_checkpoint.json").write_text(json.dumps(marker))
    env = {**ENV, **key_env}
    subprocess.run([*EXPORT, str(step), str(tmp_path / "out"), "--trust-unverified-checkpoint"], cwd=REPO, env=env)
    assert ran.exists()
