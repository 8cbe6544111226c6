"""The one door: `setup_process` enters the CPU tuning on a CPU and only there, and the tuning checks
its settings before it changes anything, re-executes first, then fills the kernel slots (a GPU
process importing none of `dsexit.cpu`: tests/integration/cpu/test_setup_process.py)."""

from __future__ import annotations

import os

import pytest
import torch

import dsexit.cpu
from dsexit.cpu import allocator, cpu_dropout, tune_process
from dsexit.model import kernels
from dsexit.train.cluster import distributed
from dsexit.train.config import ConfigError


@pytest.fixture
def process_state(monkeypatch):
    """A world of one on the CPU, no allocator setting; the environment (setup_process writes the
    launcher's variables), threads, subnormal mode and kernel slots restored afterwards."""
    environment = dict(os.environ)
    threads = torch.get_num_threads()
    settings = (allocator.TCMALLOC_ENV, allocator.ENV, "DSEXIT_TCMALLOC_PRELOADED")
    for name in (*distributed._MPI_SIZE_VARS, "RANK", "WORLD_SIZE", *settings):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    yield monkeypatch
    os.environ.clear()
    os.environ.update(environment)
    kernels.use_defaults()
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("accelerator", ["cuda", "xpu", "cpu"])
def test_the_cpu_tuning_is_entered_on_a_cpu_and_only_there(process_state, accelerator):
    calls = []
    process_state.setattr(dsexit.cpu, "tune_process", lambda **options: calls.append(options))
    process_state.setenv("DS_ACCELERATOR", accelerator)
    world, threads = distributed.setup_process(cpu_kernels=False, reexec=False)
    assert calls == ([{"kernels": False, "reexec": False}] if accelerator == "cpu" else [])
    assert world == distributed.WorldInfo(0, 1, 0, 1, "single") and threads == torch.get_num_threads()


def test_the_cpu_tuning_fills_the_kernel_slots_and_flushes_subnormals(process_state):
    process_state.setenv(allocator.ENV, "off")  # glibc's settings are process-wide: their test has processes of its own
    tune_process(reexec=False)
    assert kernels.active.dropout is cpu_dropout and not kernels.uses_defaults()
    assert torch.tensor([1e-310], dtype=torch.float64).item() == 0.0  # a subnormal, flushed
    tune_process(kernels=False, reexec=False)  # a model to be compiled keeps torch's kernels
    assert kernels.uses_defaults()


@pytest.mark.parametrize(
    "setting", [{"DSEXIT_TCMALLOC": "/nowhere/libtcmalloc.so"}, {"DSEXIT_MALLOC_TUNING": "sometimes"}]
)
def test_a_bad_setting_is_a_config_error_before_anything_changes(process_state, setting):
    for name, value in setting.items():
        process_state.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{next(iter(setting))}=.* is invalid"):
        tune_process(reexec=False)
    assert kernels.uses_defaults()
    assert torch.tensor([1e-310], dtype=torch.float64).item() != 0.0


def test_the_tcmalloc_re_execution_comes_before_any_other_setting(process_state):
    class Exec(Exception):
        pass

    def execve(path, args, env):
        raise Exec

    process_state.setenv(allocator.TCMALLOC_ENV, "auto")
    process_state.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    process_state.setattr(allocator.os, "execve", execve)
    with pytest.raises(Exec):
        tune_process()
    assert kernels.uses_defaults()  # the re-executed process sets everything up afresh
