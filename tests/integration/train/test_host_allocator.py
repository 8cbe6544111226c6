"""The host allocator keeps freed tensor memory for reuse, unless the user turns it off (a process
of its own each time: malloc settings are process-wide)."""

import os
import subprocess
import sys

import pytest

from dsexit.train import host_allocator

# Allocates and frees a 48 MiB tensor in its own process (malloc settings are process-wide), then
# prints the bytes glibc holds free in its heap for the next allocation (mallinfo2's fordblks).
_PROBE = """
import ctypes, torch
from dsexit.train.host_allocator import keep_freed_memory
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
    env = {**os.environ, host_allocator.ENV: setting}
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
