"""Checkpoint bookkeeping in process, no launch: markers, digests, rewrite order, retention by
run, the mirror's catch-up after a failed upload, write probes, the run-directory plan, and
the checks `--resume` makes before any work. DeepSpeed is replaced by an engine that writes
two small files, so each test takes milliseconds; the same paths run for real in
test_run_identity.py, test_checkpoint_safety.py and test_checkpoint_outage.py.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import fsspec
import pytest

from dsexit.storage import RetryPolicy
from dsexit.train.checkpoint.files import (
    LATEST,
    MARKER,
    CheckpointRef,
    RemoteCheckpoints,
    open_checkpoint,
    resume_choice,
    tag_for,
    verify_files,
)
from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.checkpoint.resume import choose_checkpoint
from dsexit.train.checkpoint.retention import doomed_tags, kept_tags
from dsexit.train.checkpoint.rundir import RUN_FILE, RunDirError, plan_run, roll_aside
from dsexit.train.checkpoint.store import RemoteMirror, StorageError, probe_local_dir
from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.config import ConfigError
from dsexit.train.config.cli import parse_config
from dsexit.train.config.resolve import begin_run, resolve_run
from dsexit.train.errors import CheckpointError
from tests.helpers.checkpoints import FakeEngine

SINGLE = WorldInfo(0, 1, 0, 1, "single")


def _manager(root, run_id="run-a", keep_last=2, location=None, retries=0):
    return CheckpointManager(
        location or str(root),
        str(root),
        keep_last,
        SINGLE,
        run_id=run_id,
        policy=RetryPolicy(retries, base_delay_s=0.01),
    )


def _save(manager, engine, step):
    return manager.save(engine, step, {"step": step})


def _tags(root):
    return sorted((name for name in os.listdir(root) if name.startswith("global_step")), key=lambda n: int(n[11:]))


# ---------------------------------------------------------------- the resume rule
def test_one_rule_chooses_the_checkpoint_to_resume_here_or_on_the_mirror(tmp_path):
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    mirrored, engine = _manager(tmp_path / "elsewhere", location=url, keep_last=5), FakeEngine()
    manager = _manager(tmp_path / "here", keep_last=5)
    for step in (1, 2, 3):
        _save(manager, engine, step)
    root = str(tmp_path / "here")
    assert choose_checkpoint("none", root) is None
    assert choose_checkpoint(str(tmp_path / "here" / "global_step2"), root).tag == "global_step2"
    assert choose_checkpoint("auto", root).tag == "global_step3"
    manager.point_latest(open_checkpoint(str(tmp_path / "here" / "global_step2")))  # a rollback
    assert choose_checkpoint("auto", root).tag == "global_step2"
    remote = RemoteCheckpoints(url)
    assert choose_checkpoint("auto", root, remote).tag == "global_step2"  # an empty mirror
    _save(mirrored, engine, 4)
    chosen = choose_checkpoint("auto", root, remote)
    assert (chosen.tag, chosen.root) == ("global_step4", url)  # the mirror's is newer
    assert manager.find_resume("auto").tag == "global_step2"  # the manager applies the same rule
    with pytest.raises(FileNotFoundError):
        choose_checkpoint(str(tmp_path / "nowhere"), root)


# ---------------------------------------------------------------- markers and digests
def test_marker_lists_every_file_and_verification_names_the_bad_one(tmp_path):
    ref = _save(_manager(tmp_path), FakeEngine(), 3)
    assert set(ref.meta["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert ref.meta["run_id"] == "run-a" and (tmp_path / LATEST).read_text() == "global_step3"
    verify_files(open_checkpoint(ref.path))

    shard = tmp_path / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt has sha256"):
        verify_files(open_checkpoint(ref.path))
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is not listed"):
        verify_files(open_checkpoint(ref.path))


def test_a_malformed_marker_is_reported_as_malformed_not_missing(tmp_path):
    _save(_manager(tmp_path), FakeEngine(), 2)
    (tmp_path / "global_step2" / MARKER).write_text('{"step": 2, "files": ')
    with pytest.raises(CheckpointError, match="malformed"):
        open_checkpoint(str(tmp_path / "global_step2"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(str(tmp_path / "global_step9"))


# ---------------------------------------------------------------- rewrite and retention
def test_a_step_written_again_loses_its_marker_before_any_file(tmp_path):
    manager, engine = _manager(tmp_path, keep_last=5), FakeEngine()
    for step in (1, 2, 3):
        _save(manager, engine, step)
    manager.point_latest(open_checkpoint(str(tmp_path / "global_step1")))  # a rollback to step 1
    _save(manager, engine, 2)
    assert engine.calls[-1] is None  # DeepSpeed found no old marker (nor old files) under the tag it rewrites
    assert resume_choice(str(tmp_path)).tag == "global_step2"
    assert _tags(tmp_path) == ["global_step1", "global_step2", "global_step3"]  # the newer step is kept


def test_retention_counts_only_this_runs_checkpoints_and_keeps_what_latest_names(tmp_path):
    other, engine = _manager(tmp_path, run_id="run-old", keep_last=5), FakeEngine()
    for step in (10, 20, 30):
        _save(other, engine, step)
    ours = _manager(tmp_path, run_id="run-new", keep_last=1)
    _save(ours, engine, 1)
    _save(ours, engine, 2)
    # keep-last 1 over this run's steps: 1 goes, 2 (just saved, named by latest) stays; the other run is untouched
    assert _tags(tmp_path) == ["global_step2", "global_step10", "global_step20", "global_step30"]
    assert (tmp_path / LATEST).read_text() == "global_step2"


def test_rollback_keeps_newer_checkpoints_and_pruning_never_takes_the_one_just_saved(tmp_path):
    manager, engine = _manager(tmp_path, keep_last=1), FakeEngine()
    for step in (5, 10):
        _save(manager, engine, step)
    manager.keep_last = 5
    for step in (15, 20):
        _save(manager, engine, step)
    manager.keep_last = 1
    manager.point_latest(open_checkpoint(str(tmp_path / "global_step10")))
    _save(manager, engine, 11)
    assert _tags(tmp_path) == ["global_step11", "global_step15", "global_step20"]
    assert (tmp_path / LATEST).read_text() == "global_step11"


def test_retention_is_a_rule_over_markers():
    def ref(step):
        return CheckpointRef("/ckpt", tag_for(step), {"step": step})

    complete = {tag_for(step): {"step": step, "run_id": "a"} for step in (1, 2, 3, 4)}
    complete[tag_for(5)] = {"step": 5, "run_id": "b"}  # another run's, newer
    kept = kept_tags(complete, ref(3), latest="global_step1", keep_last=2, run_id="a")
    assert kept == {"global_step1", "global_step2", "global_step3"}
    names = [*complete, "global_step0", "global_step6", "latest", "universal"]  # step 0 and 6: torn saves
    assert doomed_tags(names, complete, kept, ref(3), run_id="a") == ["global_step0"]  # 4 and 6: newer than 3
    assert doomed_tags(names, complete, kept_tags(complete, ref(4), None, 1, "a"), ref(4), run_id="a") == [
        "global_step1",
        "global_step2",
        "global_step3",
        "global_step0",
    ]


# ---------------------------------------------------------------- the mirror
def test_a_failed_upload_keeps_the_local_copy_and_the_next_save_uploads_it(tmp_path, monkeypatch):
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    manager, engine = _manager(tmp_path, location=url, keep_last=3), FakeEngine()
    fs = fsspec.filesystem("memory")
    real_put = manager.mirror.remote.fs.put_file

    def unreachable(*args, **kwargs):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(manager.mirror.remote.fs, "put_file", unreachable)
    _save(manager, engine, 1)  # the upload fails: a warning, not a crash
    assert (tmp_path / "global_step1" / MARKER).exists()
    assert not fs.exists(f"{url}/global_step1/{MARKER}")
    monkeypatch.setattr(manager.mirror.remote.fs, "put_file", real_put)
    _save(manager, engine, 2)
    for step in (1, 2):
        remote = json.loads(fs.cat(f"{url}/{tag_for(step)}/{MARKER}"))
        assert remote == json.loads((tmp_path / tag_for(step) / MARKER).read_text())
        for name in remote["files"]:
            assert fs.cat(f"{url}/{tag_for(step)}/{name}") == (tmp_path / tag_for(step) / name).read_bytes()
    assert fs.cat(f"{url}/{LATEST}") == b"global_step2"


def test_a_nodes_copy_gets_the_other_nodes_shards_from_the_mirror_for_the_export(tmp_path):
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    manager = _manager(tmp_path, location=url)
    saved = _save(manager, FakeEngine(), 4)
    # a node with its own disk holds only its own ranks' shards
    other_nodes = tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    written = other_nodes.read_bytes()
    other_nodes.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        verify_files(saved)
    assert manager.whole(saved) == saved
    assert other_nodes.read_bytes() == written
    verify_files(saved)


def test_a_world_of_one_fetches_the_lost_nodes_shards_or_falls_back_to_the_mirrors_choice(tmp_path, caplog):
    """After an elastic job shrinks to one node: its copy of the newest step lacks the lost node's shards.
    On the mirror they are fetched; a step whose upload the loss cut short gives way to the mirror's newest."""
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    manager = _manager(tmp_path, location=url, keep_last=3)
    for step in (2, 4):
        _save(manager, FakeEngine(), step)
    lost_shard = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # as if the lost node had written it
    (tmp_path / "global_step4" / lost_shard).unlink()
    fs = fsspec.filesystem("memory")
    good = fs.cat(f"{url}/global_step4/{lost_shard}")
    fs.pipe(f"{url}/global_step4/{lost_shard}", b"planted")  # the mirror's copy altered
    with pytest.raises(CheckpointError, match=f"{lost_shard} of global_step4 fetched from .* does not match"):
        manager.find_resume("auto")
    fs.pipe(f"{url}/global_step4/{lost_shard}", good)
    (tmp_path / "global_step4" / lost_shard).unlink()
    assert manager.find_resume("auto").tag == "global_step4"  # fetched from the mirror, checked on arrival
    assert (tmp_path / "global_step4" / lost_shard).read_bytes() == good

    _save(manager, FakeEngine(), 6)
    fs.rm(f"{url}/global_step6", recursive=True)  # its upload never finished
    (tmp_path / "global_step6" / lost_shard).unlink()
    with caplog.at_level(logging.WARNING, logger="dsexit"):
        assert manager.find_resume("auto").tag == "global_step4"
    assert "global_step6 lacks shards that only a node gone from the job held" in caplog.text


# ---------------------------------------------------------------- before step 1
def test_probes_name_a_file_path_and_a_read_only_directory(tmp_path):
    file_path = tmp_path / "a-file"
    file_path.write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        probe_local_dir(str(file_path), "checkpoint_dir")
    with pytest.raises(StorageError, match="not writable"):
        probe_local_dir(str(file_path / "below"), "checkpoint_dir")
    probe_local_dir(str(tmp_path / "fresh" / "checkpoints"), "run_dir")
    assert not (tmp_path / "fresh").exists()  # a probe leaves no trace, not even the directories it made


def _resolve(argv):
    config, _ = parse_config(argv)
    return resolve_run(config, SINGLE, threads=1)


def test_max_steps_1_derives_a_warmup_that_fits(tmp_path):
    run = _resolve(["--run-dir", str(tmp_path / "r"), "--max-steps", "1"])
    assert run.ds_config["scheduler"]["params"]["warmup_num_steps"] == 1
    assert _resolve(["--run-dir", str(tmp_path / "r"), "--max-steps", "2"]).config.warmup_steps(2) == 1
    assert _resolve(["--run-dir", str(tmp_path / "r"), "--max-steps", "100"]).config.warmup_steps(100) == 10


def test_credentials_in_a_checkpoint_url_never_reach_the_message(tmp_path):
    with pytest.raises(ConfigError) as raised:
        _resolve(
            [
                "--run-dir",
                str(tmp_path / "r"),
                "--checkpoint-dir",
                "s3://AKIAX:hunter2@nobucket/x",
                "--checkpoint-retries",
                "0",
            ]
        )
    message = str(raised.value)
    assert "hunter2" not in message and "AKIAX" not in message and "checkpoint_dir=" in message
    assert "\n" not in message


def test_resolution_reads_the_checkpoint_and_begin_run_moves_an_old_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    manager = _manager(run_dir / "checkpoints", keep_last=5)
    saved = manager.save(FakeEngine(), 4, {"step": 4, "dp_size": 2, "zero_stage": 2})
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": "run-a"}))
    run = _resolve(["--run-dir", str(run_dir), "--max-steps", "8"])  # --resume auto, one rank, ZeRO 2
    assert run.resume_from.tag == saved.tag and run.run_plan.mode == "continue"
    assert run.ds_config["checkpoint"]["load_universal"]  # saved at data-parallel size 2, resumed at 1
    assert run.resuming(run.resume_from) is run and begin_run(run).run_id == "run-a"

    fresh = _resolve(["--run-dir", str(run_dir), "--max-steps", "8", "--resume", "none", "--start-over"])
    assert fresh.run_plan.move_aside == (str(run_dir),) and run_dir.exists()  # resolution moves nothing
    logger = logging.getLogger("dsexit")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        begun = begin_run(fresh)  # the log moved with the old run: logging starts again in a new one
    finally:
        for handler in logger.handlers:
            handler.close()
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
    [moved] = tmp_path.glob("run.old-*")
    assert (moved / RUN_FILE).exists() and (moved / "checkpoints" / saved.tag).is_dir()
    assert begun.run_id not in (None, "run-a") and not (run_dir / RUN_FILE).exists()
    assert not (run_dir / "checkpoints").exists() and (run_dir / "train.log").exists()


def test_the_plan_refuses_a_new_run_in_a_used_directory(tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    manager, engine = _manager(root), FakeEngine()
    ref, newest = _save(manager, engine, 4), _save(manager, engine, 8)
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": "run-a"}))
    common = dict(run_dir=str(run_dir), checkpoint_root=str(root), remote_steps=[], remote_shown=None)
    with pytest.raises(RunDirError, match="already holds run run-a with checkpoints up to step 8.*--start-over"):
        plan_run(resume="none", start_over=False, chosen=None, **common)
    assert plan_run(resume="auto", start_over=False, chosen=newest, **common).mode == "continue"
    rollback = plan_run(resume=ref.path, start_over=False, chosen=ref, **common)
    assert rollback.mode == "rollback" and rollback.rolled_back == ("global_step8",)
    assert plan_run(resume=ref.path, start_over=False, chosen=ref, **{**common, "remote_steps": [4]}).rolled_back
    assert plan_run(resume=newest.path, start_over=False, chosen=newest, **common).mode == "continue"
    fresh = plan_run(resume="none", start_over=True, chosen=None, **common)
    assert fresh.mode == "new" and fresh.move_aside == (str(run_dir),)
    with pytest.raises(RunDirError, match="another run's checkpoint"):
        plan_run(
            resume="/elsewhere/global_step3",
            start_over=False,
            chosen=open_checkpoint(ref.path).__class__("/elsewhere", "global_step3", {"step": 3}),
            **common,
        )
    assert (
        plan_run(
            run_dir=str(tmp_path / "unused"),
            checkpoint_root=str(tmp_path / "unused" / "checkpoints"),
            remote_steps=[],
            remote_shown=None,
            resume="none",
            start_over=False,
            chosen=None,
        ).mode
        == "new"
    )


def test_a_resume_must_fit_the_model_shape_and_the_seed(tmp_path):
    from dsexit.model import ElectraExitConfig
    from dsexit.train.checkpoint.files import CheckpointRef
    from dsexit.train.config.resolve import check_fits

    tiny = ElectraExitConfig.from_preset("electra-tiny")
    ref = CheckpointRef(
        str(tmp_path),
        "global_step4",
        {"step": 4, "model_config": tiny.to_dict(), "config": {"train": {"job": {"seed": 7}}}},
    )
    check_fits(ref, ElectraExitConfig.from_preset("electra-tiny", exit_threshold=0.5), 7)  # not a shape
    with pytest.raises(ConfigError, match="another shape: saved with .*hidden_size=64.*this run has .*hidden_size=256"):
        check_fits(ref, ElectraExitConfig.from_preset("electra-small"), 7)
    with pytest.raises(ConfigError, match="seed=8 is invalid; .* seed=7"):
        check_fits(ref, tiny, 8)


def test_a_probe_outlives_another_nodes_clean_up_between_its_mkdirs(tmp_path, monkeypatch):
    """Nodes on a shared filesystem probe the same new directories at once, and each removes what its
    probe created: a parent can vanish between two of another probe's mkdirs (FileNotFoundError from
    makedirs). The probe tries again rather than failing the run as unwritable."""
    import dsexit.train.checkpoint.store as store

    target = tmp_path / "runs" / "a" / "checkpoints"
    real_makedirs, calls = os.makedirs, []

    def parent_removed_once(path, exist_ok=False):
        calls.append(path)
        if len(calls) == 1:
            real_makedirs(os.path.dirname(path), exist_ok=True)
            os.rmdir(os.path.dirname(path))  # another node's clean-up, mid-chain
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_makedirs(path, exist_ok=exist_ok)

    monkeypatch.setattr(store.os, "makedirs", parent_removed_once)
    probe_local_dir(str(target), "checkpoint_dir")
    assert len(calls) > 1  # it tried again
    assert not (tmp_path / "runs").exists()  # what the probe created is gone again


def test_roll_aside_moves_each_newer_step_whole_and_leaves_the_rest(tmp_path):
    manager, engine = _manager(tmp_path), FakeEngine()
    for step in (2, 4, 6):
        _save(manager, engine, step)
    before = {tag: sorted(os.listdir(tmp_path / tag)) for tag in ("global_step4", "global_step6")}
    stays = sorted(set(os.listdir(tmp_path)) - set(before))
    folder = roll_aside(str(tmp_path), ("global_step4", "global_step6", "global_step9"), "20260101-000000")
    assert folder == str(tmp_path / "rolled-back-20260101-000000")
    assert {tag: sorted(os.listdir(os.path.join(folder, tag))) for tag in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted([*stays, "rolled-back-20260101-000000"]) and "latest" in stays
    assert roll_aside(str(tmp_path), ("global_step9",), "20260101-000001") is None


def test_the_mirror_moves_a_step_aside_by_copy_then_delete():
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    fs = fsspec.filesystem("memory")
    for name in ("dsexit_checkpoint.json", "mp_rank_00_model_states.pt"):
        fs.pipe(f"{url}/global_step6/{name}", name.encode())
    mirror = RemoteMirror(url)
    mirror.move("global_step6", "rolled-back-20260101-000000")
    assert not fs.exists(f"{url}/global_step6")
    for name in ("dsexit_checkpoint.json", "mp_rank_00_model_states.pt"):
        assert fs.cat(f"{url}/rolled-back-20260101-000000/global_step6/{name}") == name.encode()
