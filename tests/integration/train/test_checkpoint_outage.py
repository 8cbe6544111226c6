"""An S3 outage in the middle of checkpointing: retried, survived, and caught up afterwards.

A real moto server on 127.0.0.1 is stopped while a run that saves every second step to
s3:// is saving, and started again (empty, as a restarted moto is) 8 s later. Uploads go
through the data reader's retry policy; with `--checkpoint-retries 3` (and botocore's own
retries off) the outage outlasts the retries, so saves in it fail their upload: the run
must carry on, keep its local checkpoints, and once the store is back the next save
uploads every kept checkpoint the bucket lacks. At the end the bucket holds exactly the
local checkpoints, byte for byte. The start-up reads of a checkpoint location wait out a
store that comes up late.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from tests.helpers.servers import S3Server

from .helpers import TINY, finish, start, wait_for_step

MARKER = "dsexit_checkpoint.json"
KEY_ID, SECRET = "AKIDOUTAGE", "outage-secret"


def _bucket_fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, client_kwargs={"endpoint_url": endpoint})


def test_an_outage_mid_save_is_retried_and_the_next_save_uploads_what_is_missing(tmp_path):
    server = S3Server(tmp_path / "moto", key_id=KEY_ID, secret=SECRET).start()
    endpoint = server.endpoint
    env = {**server.env, "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: the trainer's policy is under test
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    _bucket_fs(endpoint).mkdir(bucket)
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "--max-steps",
        "20",
        "--save-interval",
        "2",
        "--keep-last",
        "2",
        "--eval-interval",
        "0",
        "--no-export-hf",
        "--checkpoint-dir",
        f"s3://{bucket}/run",
        "--checkpoint-retries",
        "3",
    ]
    process = start("python", run_dir, args, nproc=1, env=env)
    try:
        wait_for_step(run_dir, 4, process)  # step 4 is being saved now
        server.stop()
        time.sleep(8)
        server.start()  # the same endpoint, empty
        fs = _bucket_fs(endpoint)
        fs.mkdir(bucket)
        done = finish(process, run_dir, timeout=400)
        assert done.returncode == 0, done.output[-4000:]
        assert "Traceback" not in done.output

        local = done.checkpoints
        assert (local / "latest").read_text() == "global_step20"
        fs.invalidate_cache()
        assert fs.cat(f"{bucket}/run/latest") == b"global_step20"
        assert sorted(path.rsplit("/", 1)[1] for path in fs.ls(f"{bucket}/run")) == [
            "global_step18",
            "global_step20",
            "latest",
        ]
        for tag in ("global_step18", "global_step20"):
            marker = json.loads((local / tag / MARKER).read_text())
            assert json.loads(fs.cat(f"{bucket}/run/{tag}/{MARKER}")) == marker
            for name in marker["files"]:
                assert fs.cat(f"{bucket}/run/{tag}/{name}") == (local / tag / name).read_bytes(), (tag, name)
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()


def test_start_up_reads_of_the_checkpoint_location_are_retried(tmp_path, monkeypatch):
    import s3fs

    from dsexit.storage import RetryPolicy
    from dsexit.train.checkpoint.files import RemoteCheckpoints

    s3fs.S3FileSystem.clear_instance_cache()  # one made earlier in this process may know another endpoint
    server = S3Server(tmp_path, key_id=KEY_ID, secret=SECRET)  # its port is fixed now; it starts late, below
    endpoint = server.endpoint
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    servers = []

    def come_up_late():
        time.sleep(6)  # past s3fs's own few quick retries: the run's policy has to wait it out
        servers.append(server.start())
        _bucket_fs(endpoint).mkdir(bucket)

    late = threading.Thread(target=come_up_late)
    late.start()
    policy = RetryPolicy(8, base_delay_s=0.5, max_delay_s=2.0)
    try:
        index = RemoteCheckpoints(f"s3://{bucket}/run", policy)
        index.remote.probe()  # the write probe of a run's start, through the same policy
        assert servers, "the probe returned before the server was up"
        assert index.steps() == []
    finally:
        late.join()
        for server in servers:
            server.stop()
