"""The host allocator of a CPU training process: glibc's malloc kept from returning freed tensor
memory, and tcmalloc preloaded when the user asks for it.

A CPU training step allocates and frees the same large temporaries every step: activations,
attention scores, dropout masks, the generator's vocabulary-wide logits of the masked tokens.
glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh `mmap` and
hands the freed top of its heap back to the kernel, so each step page-faults through memory it
freed a moment ago. `keep_freed_memory` has every block come from the heap (no `mmap`) and keeps
freed memory for reuse, as jemalloc and tcmalloc keep theirs, and has every thread allocate from
one heap: with glibc's per-thread arenas, a block one thread frees waits in that thread's arena,
unusable by the others, and a process whose block sizes change every step (exit training) grows
its arenas without bound. `DSEXIT_MALLOC_TUNING=off` leaves glibc's defaults; an allocator
preloaded with `LD_PRELOAD` is unaffected either way (the settings only reach glibc's malloc).

tcmalloc serves these steps better still (PyTorch's CPU tuning guide suggests preloading it). It
must be loaded before the interpreter starts: set `LD_PRELOAD` (the CPU image does), or
`DSEXIT_TCMALLOC=auto` (or the library's path) to have the process re-execute itself with it
(`preload_tcmalloc`). Unset or `off`, nothing is re-executed. What was measured: docs/cpu.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

from dsexit.host_allocator import PRELOADED_ALLOCATORS

ENV = "DSEXIT_MALLOC_TUNING"
_CHOICES = ("on", "off")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_TRIM_THRESHOLD = (1 << 31) - 1  # the largest an int setting takes: freed heap tops stay
_TOP_PAD = 64 << 20


def tuning_choice() -> str:
    """The user's `DSEXIT_MALLOC_TUNING` (default "on"); a bad value is a config error."""
    from dsexit.train.errors import ConfigError

    choice = os.environ.get(ENV, "on").strip().lower()
    if choice not in _CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is invalid; expected one of {', '.join(_CHOICES)}.")
    return choice


def keep_freed_memory() -> bool:
    """Apply the settings when the process runs on glibc and the user has not turned them off;
    True if they took effect."""
    if tuning_choice() == "off" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on (find_library would start a process)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt is a no-op stub
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(parameter, value)
        for parameter, value in (
            (_M_MMAP_MAX, 0),  # no block is mapped on its own: all come from (and return to) the heap
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
            (_M_ARENA_MAX, 1),  # one heap for every thread (see the module docstring)
        )
    )


TCMALLOC_ENV = "DSEXIT_TCMALLOC"
_PRELOADED_ENV = "DSEXIT_TCMALLOC_PRELOADED"  # set in the re-executed process: it never re-executes again


def tcmalloc_choice() -> str:
    """The user's `DSEXIT_TCMALLOC`: "off" (default, also when unset or empty), "auto", or the path of
    a tcmalloc library."""
    from dsexit.train.errors import ConfigError

    choice = os.environ.get(TCMALLOC_ENV, "").strip() or "off"
    if choice.lower() in ("auto", "off"):
        return choice.lower()
    if not os.path.isfile(choice):
        raise ConfigError(
            f"{TCMALLOC_ENV}={choice!r} is invalid; expected auto, off, or the path of a tcmalloc library "
            "(e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)."
        )
    return choice


def find_tcmalloc() -> str | None:
    """The soname of the tcmalloc the dynamic linker can load (the minimal build first), or None."""
    import ctypes.util

    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_tcmalloc() -> None:
    """With `DSEXIT_TCMALLOC=auto` or a library's path: re-run this process, same PID and arguments,
    with tcmalloc preloaded (`LD_PRELOAD`), so that the deepspeed, torchrun and MPI launchers keep
    tracking it. It must come before anything else (no process group, no MPI, no thread yet).

    Nothing happens when `DSEXIT_TCMALLOC` is unset or off, when `auto` finds no tcmalloc installed
    (Debian/Ubuntu: libtcmalloc-minimal4), or when `LD_PRELOAD` already names an allocator."""
    choice = tcmalloc_choice()
    if choice == "off" or os.environ.get(_PRELOADED_ENV) or not sys.platform.startswith("linux"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in PRELOADED_ALLOCATORS):
        return
    library = find_tcmalloc() if choice == "auto" else choice
    if library is None:
        return
    env = {
        **os.environ,
        "LD_PRELOAD": f"{library}:{preload}" if preload else library,
        _PRELOADED_ENV: library,
        # tcmalloc reports every allocation over 1 GiB on stderr; a large batch's activations are not news.
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),
    }
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
