"""The host allocator keeps freed tensor memory for reuse, unless the user turns it off, and tcmalloc is
preloaded when the user asks for it (a process of its own each time: malloc settings are process-wide)."""

import os
import re
import subprocess
import sys

import pytest

from dsexit.cpu import allocator
from tests.helpers import REPO
from tests.integration.cluster.test_docker import parse_dockerfile

# Allocates and frees a 48 MiB tensor in its own process (malloc settings are process-wide), then
# prints the bytes glibc holds free in its heap for the next allocation (mallinfo2's fordblks).
_PROBE = """
import ctypes, torch
from dsexit.cpu.allocator import keep_freed_memory
print("applied", keep_freed_memory())
for _ in range(3):
    block = torch.ones(12 << 20)  # 48 MiB of float32
    del block

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
print("free_in_heap", libc.mallinfo2().fordblks)
"""


def _probe(setting: str) -> tuple[bool, int]:
    env = {**os.environ, allocator.ENV: setting}
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    values = dict(line.split() for line in result.stdout.splitlines())
    return values["applied"] == "True", int(values["free_in_heap"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_freed_tensor_memory_stays_in_the_heap_only_when_tuned():
    applied, kept = _probe("on")
    assert applied
    assert kept >= 48 << 20  # the freed block waits for the next step's allocation
    applied, kept = _probe("off")
    assert not applied
    assert kept < 48 << 20  # glibc's default unmapped it: the next allocation page-faults afresh


# A 16 MiB block allocated and freed by the main thread, then the same size allocated and freed by
# another thread: how much the heaps (all arenas together, mallinfo2's arena) grew for the second.
_THREADS_PROBE = """
import ctypes, threading, torch
from dsexit.cpu.allocator import keep_freed_memory
keep_freed_memory()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def allocate_and_free():
    block = torch.ones(4 << 20)  # 16 MiB of float32
    del block

allocate_and_free()
before = libc.mallinfo2().arena
worker = threading.Thread(target=allocate_and_free)
worker.start()
worker.join()
print("grew", libc.mallinfo2().arena - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_memory_one_thread_freed_is_reused_by_another():
    """With glibc's per-thread arenas, a block freed by one thread waits in that thread's arena; an exit-
    training process, whose block sizes change every step, grows its heaps without bound that way
    (docs/cpu.md). Tuned, every thread allocates from one arena."""
    env = {**os.environ, allocator.ENV: "on"}
    result = subprocess.run([sys.executable, "-c", _THREADS_PROBE], env=env, capture_output=True, text=True, check=True)
    grew = int(result.stdout.split()[-1])
    assert grew < 16 << 20, grew  # the worker reused the block the main thread freed


# Prints its PID and allocator, preloads tcmalloc (re-executing itself when asked to, so these lines
# then print twice), then its PID, allocator and arguments once it goes on.
_PRELOAD_PROBE = """
import os, sys
from dsexit.cpu.allocator import preload_tcmalloc
from dsexit.host_allocator import allocator_in_use
print("start", os.getpid(), allocator_in_use(), flush=True)
preload_tcmalloc()
print("on", os.getpid(), allocator_in_use(), *sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is the Linux dynamic linker's")
@pytest.mark.parametrize("setting", ["auto", "off", None])
def test_tcmalloc_is_preloaded_into_the_same_process_with_the_same_arguments_when_asked_for(setting):
    if allocator.find_tcmalloc() is None:
        pytest.fail("no tcmalloc library: install libtcmalloc-minimal4 (scripts/setup_system.sh does)")
    unset = ("LD_PRELOAD", "DSEXIT_TCMALLOC_PRELOADED", allocator.TCMALLOC_ENV)
    env = {key: value for key, value in os.environ.items() if key not in unset}
    if setting is not None:  # None: the default, unset
        env[allocator.TCMALLOC_ENV] = setting
    command = [sys.executable, "-c", _PRELOAD_PROBE, "--flag", "two words"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    lines = [line.split(maxsplit=3) for line in result.stdout.splitlines()]
    pid = lines[0][1]
    if setting == "auto":
        assert lines == [
            ["start", pid, "glibc"],
            ["start", pid, "tcmalloc"],
            ["on", pid, "tcmalloc", "--flag two words"],
        ]
    else:
        assert lines == [["start", pid, "glibc"], ["on", pid, "glibc", "--flag two words"]]
    assert result.stderr == ""


def test_the_cpu_image_preloads_the_tcmalloc_it_installs():
    """docker/Dockerfile.cpu installs libtcmalloc-minimal4 and preloads it in every process it runs, after
    its build steps; the name it gives LD_PRELOAD loads tcmalloc here (the dynamic linker's search)."""
    instructions = parse_dockerfile(REPO / "docker" / "Dockerfile.cpu")
    install = next(
        i
        for i, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and re.search(r"apt-get install [^&]*\blibtcmalloc-minimal4\b", arguments)
    )
    ((position, preload),) = [
        (i, dict(pair.split("=", 1) for pair in arguments.split())["LD_PRELOAD"])
        for i, (keyword, arguments) in enumerate(instructions)
        if keyword == "ENV" and "LD_PRELOAD=" in arguments
    ]
    assert install < position
    assert all(keyword != "RUN" for keyword, _ in instructions[position:])  # the build itself runs on glibc
    if allocator.find_tcmalloc() is None:
        pytest.fail("no tcmalloc library: install libtcmalloc-minimal4 (scripts/setup_system.sh does)")
    env = {key: value for key, value in os.environ.items() if key != allocator.TCMALLOC_ENV}
    env["LD_PRELOAD"] = preload
    probe = "from dsexit.host_allocator import allocator_in_use; print(allocator_in_use())"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["tcmalloc"], result.stderr
