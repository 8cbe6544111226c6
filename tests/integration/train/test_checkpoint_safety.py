"""The trust boundary and the storage checks of checkpoints, with real processes.

A checkpoint file that differs from the digest its completion marker records, or a file
the marker does not list, is refused (one line naming it) before DeepSpeed unpickles
anything; dsexit's own loads are `weights_only`. Every location the run writes is probed
before step 1 (a read-only filesystem, a file where a directory belongs), and a disk that
fills up while saving reads as one line naming the device. The filesystems are real
tmpfs mounts (root, as the network-namespace tests; without it they fail, not skip).
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import subprocess

import pytest

from .helpers import TINY, launch
from .test_run_identity import errors, without

ARGS = [
    *without(TINY, "--warmup-steps"),
    "--max-steps",
    "2",
    "--save-interval",
    "1",
    "--keep-last",
    "2",
    "--eval-interval",
    "0",
    "--no-export-hf",
]


@contextlib.contextmanager
def tmpfs(path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        # CI runs as root (the network-namespace tests need the same privilege): a refusal fails
        raise AssertionError(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    return launch("python", tmp_path_factory.mktemp("safety") / "run", ARGS, nproc=1).check()


def test_a_changed_file_is_refused_in_one_line_before_deepspeed_opens_it(two_steps, tmp_path):
    copy = tmp_path / "global_step2"
    shutil.copytree(two_steps.checkpoints / "global_step2", copy)
    [shard] = copy.glob("*optim_states.pt")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    resumed = launch("python", tmp_path / "resumed", [*ARGS, "--max-steps", "3", "--resume", str(copy)], nproc=1)
    assert resumed.returncode == 2, resumed.output[-3000:]
    [line] = errors(resumed.output)
    assert shard.name in line and "sha256" in line and "Traceback" not in resumed.output
    assert not (tmp_path / "resumed" / "checkpoints" / "global_step3").exists()


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_export_refuses_a_planted_file_and_loads_its_own_files_weights_only(two_steps, tmp_path):
    from dsexit.train.errors import CheckpointError
    from dsexit.train.export import export_hf, load_weights_only

    copy = tmp_path / "global_step2"
    shutil.copytree(two_steps.checkpoints / "global_step2", copy)
    (copy / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps(_Planted(), protocol=2))
    with pytest.raises(CheckpointError, match="zero_pp_rank_7_mp_rank_00_optim_states.pt"):
        export_hf(str(copy), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()

    states = load_weights_only(str(copy / "mp_rank_00_model_states.pt"))  # module weights, client state, RNG states
    assert states["module"] and states["dsexit"]["progress"]["step"] == 2
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(str(copy / "zero_pp_rank_7_mp_rank_00_optim_states.pt"))


def test_read_only_or_file_checkpoint_dirs_fail_before_step_1(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        refused = launch("python", tmp_path / "run", [*ARGS, "--checkpoint-dir", str(read_only)], nproc=1)
    assert refused.returncode == 2, refused.output[-3000:]
    [line] = errors(refused.output)
    assert "checkpoint_dir" in line and str(read_only) in line

    a_file = tmp_path / "not-a-dir"
    a_file.write_text("user data")
    refused = launch("python", tmp_path / "run", [*ARGS, "--checkpoint-dir", str(a_file)], nproc=1)
    assert refused.returncode == 2
    [line] = errors(refused.output)
    assert str(a_file) in line and a_file.read_text() == "user data"
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_full_disk_while_saving_is_one_line_naming_the_device(tmp_path):
    with tmpfs(tmp_path / "small", "size=4m") as small:
        full = launch("python", tmp_path / "run", [*ARGS, "--checkpoint-dir", str(small)], nproc=1)
        leftovers = [path.name for path in small.iterdir()]
    assert full.returncode == 1, full.output[-3000:]
    [line] = errors(full.output)
    assert "tmpfs" in line and str(small) in line and "global_step1" in line  # device, mount, step
    assert "Traceback" not in full.output and "enforce fail" not in full.output
    assert "global_step1" not in leftovers  # the torn step gave its space back
