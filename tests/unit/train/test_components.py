"""Trainer components in isolation: rank discovery, threads, checkpoint bookkeeping."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from dsexit.train.checkpoint.files import MARKER, complete_checkpoints, newest_complete, tag_for
from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.checkpoint.store import file_owner
from dsexit.train.cluster import distributed
from dsexit.train.cluster.distributed import WorldInfo

LAUNCHER_VARS = (*distributed.LAUNCHER_VARIABLES, "OMP_NUM_THREADS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_ranks_from_torchrun_and_deepspeed_variables(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets
    assert distributed.discover_world() == WorldInfo(3, 4, 1, 2, "env")
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's name
    clean_env.delenv("LOCAL_SIZE")
    assert distributed.discover_world().local_world_size == 2


def test_a_plain_python_process_is_a_world_of_one(clean_env):
    world = distributed.discover_world()
    assert world == WorldInfo(0, 1, 0, 1, "single")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_threads_are_cores_over_local_ranks(clean_env):
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert distributed.configure_threads(WorldInfo(0, 2, 0, 2, "env")) == max(1, cores // 2)
        clean_env.setenv("OMP_NUM_THREADS", "1")
        assert distributed.configure_threads(WorldInfo(0, 1, 0, 1, "single")) == 1  # the user's choice wins
    finally:
        torch.set_num_threads(before)


def _tool(directory, name="ninja"):
    directory.mkdir(parents=True)
    tool = directory / name
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    return str(tool)


def test_a_rank_started_by_a_login_shell_finds_its_environments_tools_first(monkeypatch, tmp_path):
    """pdsh's ranks get the login shell's PATH, a system ninja first; set up, they find the virtual
    environment's ninja (the one that built DeepSpeed's cached ops), the rest of PATH kept in order."""
    system_bin, other_bin, venv = tmp_path / "usr" / "bin", tmp_path / "opt" / "bin", tmp_path / "venv"
    _tool(system_bin)
    own = _tool(venv / "bin")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(system_bin), str(venv / "bin"), str(other_bin)]))
    distributed.put_own_tools_first()
    assert shutil.which("ninja") == own
    assert os.environ["PATH"].split(os.pathsep) == [str(venv / "bin"), str(system_bin), str(other_bin)]
    distributed.put_own_tools_first()  # once is enough: a second call changes nothing
    assert os.environ["PATH"].split(os.pathsep) == [str(venv / "bin"), str(system_bin), str(other_bin)]
    # The system's interpreter (no virtual environment): PATH is the system's, untouched.
    monkeypatch.setattr(sys, "base_prefix", str(venv))
    monkeypatch.setenv("PATH", os.pathsep.join([str(system_bin), str(other_bin)]))
    distributed.put_own_tools_first()
    assert os.environ["PATH"] == os.pathsep.join([str(system_bin), str(other_bin)])


def _fake_checkpoint(root, step, complete=True):
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / MARKER).write_text(json.dumps({"step": step}))


def test_only_marked_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    for step, complete in ((10, True), (20, False), (30, True), (40, True), (50, False)):
        _fake_checkpoint(tmp_path, step, complete)
    assert [ref.step for ref in complete_checkpoints(str(tmp_path))] == [10, 30, 40]
    assert newest_complete(str(tmp_path)).tag == "global_step40"
    CheckpointManager(str(tmp_path), str(tmp_path), keep_last=2, world=WorldInfo(0, 1, 0, 1, "single")).prune()
    # 10 is beyond keep-last, 20 is a torn older save; 50 may still be being written
    assert sorted(os.listdir(tmp_path)) == ["global_step30", "global_step40", "global_step50"]


def test_every_rank_uploads_only_its_own_shards():
    assert file_owner("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1
    assert file_owner("mp_rank_00_model_states.pt") == 0
