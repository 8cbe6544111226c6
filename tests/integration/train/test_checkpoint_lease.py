"""One trainer per remote checkpoint directory: the lease object (lease.py) on a real S3 server (moto on
127.0.0.1, which honours create-only and If-Match writes), first as a protocol in process, then with
real trainers: a second trainer on the same `--checkpoint-dir` is refused in one line naming the
first; a trainer killed with SIGKILL is followed at once by its restart on the same host; and a
trainer whose lease a restart of its own job took over stops at its next save without writing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest

from .helpers import REPO, TINY, finish, launch, start, wait_for_step
from .test_object_store import _s3_env
from .test_run_identity import errors


@pytest.fixture
def store(s3_server, monkeypatch):
    from dsexit.train.checkpoint.store import RemoteMirror

    for name, value in _s3_env(s3_server.endpoint, "AKIDLEASE", "lease-secret").items():
        monkeypatch.setenv(name, value)
    url = f"{s3_server.make_bucket(f'lease-{uuid.uuid4().hex[:8]}')}/run"
    return lambda: RemoteMirror(url)


def _lease(store, **kwargs):
    from dsexit.train.checkpoint.lease import RemoteLease

    return RemoteLease(store(), **kwargs)


def test_one_of_two_starting_at_once_holds_the_lease_and_the_other_is_told_who(store):
    from dsexit.train.checkpoint.lease import LeaseError

    leases = [_lease(store, ttl_s=60, job=None) for _ in range(2)]
    outcomes = [None, None]

    def take(index):
        try:
            leases[index].acquire()
            outcomes[index] = "held"
        except LeaseError as error:
            outcomes[index] = str(error)

    threads = [threading.Thread(target=take, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcome == "held" for outcome in outcomes) == [False, True], outcomes
    refused = next(outcome for outcome in outcomes if outcome != "held")
    assert f"PID {os.getpid()}" in refused and "is in use by another trainer" in refused
    holder = next(lease for lease, outcome in zip(leases, outcomes) if outcome == "held")
    assert holder.token == 1
    holder.release()
    again = _lease(store, ttl_s=60, job=None)
    again.acquire()  # released: free at once
    again.release()


def test_a_stale_lease_is_taken_over_with_a_new_token_and_the_old_holder_is_fenced(store):
    from dsexit.train.checkpoint.lease import LeaseError

    first = _lease(store, ttl_s=2, job=None)
    first.acquire()
    first._stop.set()  # the holder hangs: no more renewals
    first.check()  # still its own
    with pytest.raises(LeaseError, match="in use by another trainer"):
        _lease(store, ttl_s=2, job=None).acquire()
    import time

    time.sleep(2.5)
    second = _lease(store, ttl_s=2, job=None)
    second.acquire()
    assert second.token == first.token + 1
    with pytest.raises(LeaseError, match=f"now token {second.token}.*ours was {first.token}"):
        first.check()
    first.release()  # not its own any more: left alone
    second.check()
    second.release()


def test_the_same_job_takes_its_lease_over_at_once(store):
    first = _lease(store, ttl_s=60, job="job-7")
    first.acquire()
    restarted = _lease(store, ttl_s=60, job="job-7")
    restarted.acquire()  # an elastic agent's restart of the job's workers
    assert restarted.token == 2
    restarted.release()
    first._stop.set()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store, tmp_path):
    from dsexit.train.checkpoint.lease import RemoteLease

    # the lease of a process that has ended (on this host), written by that process
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from dsexit.train.checkpoint.store import RemoteMirror;"
        "from dsexit.train.checkpoint.lease import RemoteLease;"
        "lease = RemoteLease(RemoteMirror(sys.argv[2]), ttl_s=600, job=None); lease.acquire(); print(lease.token)"
    )
    mirror = store()
    subprocess.run([sys.executable, "-c", script, str(REPO), mirror.url], check=True, env=dict(os.environ))
    taken = RemoteLease(mirror, ttl_s=600, job=None)
    taken.acquire()
    assert taken.token == 2
    taken.release()


# ---------------------------------------------------------------- real trainers
STEPS = [
    *TINY,
    "--max-steps",
    "400",
    "--save-interval",
    "3",
    "--keep-last",
    "2",
    "--eval-interval",
    "0",
    "--no-export-hf",
]


def test_a_second_trainer_on_the_same_checkpoint_dir_is_refused_and_a_killed_ones_restart_is_not(s3_server, tmp_path):
    import s3fs

    env = _s3_env(s3_server.endpoint, f"AKID{uuid.uuid4().hex[:12].upper()}", f"secret-{uuid.uuid4().hex}")
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    url = f"{s3_server.make_bucket(bucket)}/run"
    first = start("python", tmp_path / "first", [*STEPS, "--checkpoint-dir", url], nproc=1, env=env)
    try:
        wait_for_step(tmp_path / "first", 4, first)
        second = launch("python", tmp_path / "second", [*STEPS, "--checkpoint-dir", url], nproc=1, env=env)
        assert second.returncode == 2, second.output[-3000:]
        [line] = errors(second.output)
        assert (
            f"PID {first.pid}" in line
            and "in use by another trainer" in line
            and env["AWS_SECRET_ACCESS_KEY"] not in line
        )
        os.killpg(first.pid, signal.SIGKILL)  # no release: the lease stays behind
        finish(first, tmp_path / "first")
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}, key="a", secret="b")
        lease = json.loads(fs.cat(f"{bucket}/run/dsexit.lease"))
        assert lease["holder"]["pid"] == first.pid and lease["token"] == 1
        reached = int(fs.cat(f"{bucket}/run/latest").decode().removeprefix("global_step"))
        resumed = launch(
            "python",
            tmp_path / "third",
            [*STEPS, "--max-steps", str(reached + 3), "--checkpoint-dir", url],
            nproc=1,
            env=env,
        )
        resumed.check()
        assert "took over the lease" in resumed.output and "no longer runs" in resumed.output
        assert not fs.exists(f"{bucket}/run/dsexit.lease")  # released at the end
        assert sorted(resumed.metrics) == [reached + 1, reached + 2, reached + 3]  # resumed from the store
        latest = fs.cat(f"{bucket}/run/latest").decode()
        assert latest == f"global_step{reached + 3}"
        assert json.loads(fs.cat(f"{bucket}/run/{latest}/dsexit_checkpoint.json"))["lease_token"] == 2
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


def test_a_trainer_whose_lease_was_taken_over_stops_at_its_next_save_without_writing(s3_server, tmp_path):
    import s3fs

    env = {**_s3_env(s3_server.endpoint, "AKIDFENCE", "fence-secret"), "DSEXIT_JOB_ID": f"job-{uuid.uuid4().hex[:6]}"}
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    url = f"{s3_server.make_bucket(bucket)}/run"
    slow = [*STEPS, "--save-interval", "20"]
    first = start("python", tmp_path / "first", [*slow, "--checkpoint-dir", url], nproc=1, env=env)
    try:
        wait_for_step(tmp_path / "first", 2, first)
        from dsexit.train.checkpoint.lease import LEASE

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}, key="a", secret="b")
        lease = json.loads(fs.cat(f"{bucket}/run/{LEASE}"))
        # the job restarted elsewhere took its lease over (as an elastic agent's restart would)
        fs.pipe(
            f"{bucket}/run/{LEASE}",
            json.dumps({**lease, "token": lease["token"] + 1, "holder": {"host": "other", "pid": 1}}).encode(),
        )
        fenced = finish(first, tmp_path / "first", timeout=300)
        assert fenced.returncode == 2, fenced.output[-3000:]
        [line] = errors(fenced.output)
        assert "no longer holds" in line and "stops without writing" in line
        assert not fs.exists(f"{bucket}/run/latest")  # nothing reached the store
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
