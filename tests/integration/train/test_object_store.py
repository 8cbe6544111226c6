"""Checkpoints on an S3 URL (a real moto server on 127.0.0.1), and credentials kept secret.

Credentials reach the trainer only through the environment, as fsspec expects. A single
process checkpoints to s3://, is killed mid-save, and a fresh run directory resumes from
the bucket alone; then the secret must appear nowhere: not in either run's output, run
directory (logs, configs, checkpoints, export) or in any object in the bucket.
"""

from __future__ import annotations

import os
import signal
import uuid

from .helpers import TINY, finish, launch, start, wait_for_step

STEPS = [*TINY, "--max-steps", "9", "--save-interval", "3", "--keep-last", "2"]


def _s3_env(endpoint: str, key_id: str, secret: str) -> dict:
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def _files_containing(root, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                if needle in handle.read():
                    hits.append(path)
    return hits


def test_s3_checkpoints_resume_in_a_fresh_directory_and_never_hold_credentials(s3_server, tmp_path):
    import s3fs

    key_id, secret = f"AKID{uuid.uuid4().hex[:12].upper()}", f"secret-{uuid.uuid4().hex}"
    env = _s3_env(s3_server.endpoint, key_id, secret)
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(key=key_id, secret=secret, client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir(bucket)
    url = f"s3://{bucket}/run"

    first = launch("python", tmp_path / "first", [*STEPS, "--checkpoint-dir", url], nproc=1, env=env, kill_at_save=9)
    assert first.returncode != 0
    fs.invalidate_cache()
    assert fs.cat(f"{bucket}/run/latest") == b"global_step6"
    assert not fs.exists(f"{bucket}/run/global_step9/dsexit_checkpoint.json")

    second = launch("python", tmp_path / "second", [*STEPS, "--checkpoint-dir", url], nproc=1, env=env).check()
    assert sorted(second.metrics) == [7, 8, 9]  # a fresh directory: it resumed from the bucket's step 6
    for step in (7, 8, 9):
        assert second.metrics[step]["samples_digest"] == first.metrics[step]["samples_digest"]
        assert abs(second.metrics[step]["loss"] - first.metrics[step]["loss"]) <= 1e-6 * first.metrics[step]["loss"]
    fs.invalidate_cache()
    assert fs.cat(f"{bucket}/run/latest") == b"global_step9"
    assert sorted(path.rsplit("/", 1)[1] for path in fs.ls(f"{bucket}/run")) == [
        "global_step6",
        "global_step9",
        "latest",
    ]  # keep-last 2 applies to the bucket too

    # A file planted in the mirror (here a pickle that would leave a trace if loaded) is refused
    # before anything opens it: the completion marker lists every file of a step with its sha256.
    trace = tmp_path / "planted-pickle-ran"
    planted = f"{bucket}/run/global_step9/zz_planted.pt"
    fs.pipe(planted, b"cos\nsystem\n(S'touch " + str(trace).encode() + b"'\ntR.")
    third = launch(
        "python", tmp_path / "third", [*STEPS, "--max-steps", "12", "--checkpoint-dir", url], nproc=1, env=env
    )
    assert third.returncode == 2, third.output[-3000:]
    [error] = [line for line in third.output.splitlines() if line.startswith("pretrain.py: error:")]
    assert "zz_planted.pt" in error  # the one line names the file
    assert not trace.exists()
    fs.rm(planted)

    for launched in (first, second):
        for credential in (secret, key_id):
            assert credential not in launched.output
            assert not _files_containing(launched.run_dir, credential.encode())
    for path in fs.find(bucket):
        body = fs.cat(path)
        assert secret.encode() not in body and key_id.encode() not in body, path


def test_sigterm_to_a_single_process_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "single"
    process = start("python", run_dir, [*TINY, "--max-steps", "1000", "--save-interval", "1000"], nproc=1)
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGTERM)
    stopped = finish(process, run_dir, timeout=120)
    assert stopped.returncode == 0, stopped.output[-3000:]
    step = max(stopped.metrics)
    assert (stopped.checkpoints / "latest").read_text() == f"global_step{step}"
    assert (stopped.checkpoints / f"global_step{step}" / "dsexit_checkpoint.json").exists()
