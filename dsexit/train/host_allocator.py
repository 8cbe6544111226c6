"""glibc malloc settings that keep freed tensor memory in the process for the next step.

A CPU training step allocates and frees the same large temporaries every step: activations,
attention scores, dropout masks, the generator's [masked tokens, 30,522] vocabulary tail. glibc's
malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh `mmap` and hands
the freed top of its heap back to the kernel, so each step page-faults through memory it freed a
moment ago: copying the 70 MB vocabulary logits of an electra-small batch took 22 ms, 7 ms from
memory kept. Here every block comes from the heap (no `mmap`) and freed memory is kept for reuse,
as jemalloc and tcmalloc (which PyTorch's CPU tuning guide suggests preloading) keep theirs. Every
thread allocates from that one heap (glibc's default gives threads arenas of their own, and a block
one thread frees waits in its arena, unusable by the others): an exit-training process, whose block
sizes change every step, grew its arenas without bound that way (electra-small at target compute
0.5: 12 GB after 80 steps for 445 MB in use, still climbing 50 MB a step); with one arena it levels
off (4.9 GB from step 40: fragmentation, not growth). A process that trains on a GPU keeps glibc's
defaults: its steps allocate little host memory, and a one-off peak (a checkpoint's host copy) should
go back to the system.

`DSEXIT_MALLOC_TUNING=off` leaves glibc's defaults; another allocator preloaded with
`LD_PRELOAD` is unaffected either way (the settings only reach glibc's malloc).

Faster still on a CPU: tcmalloc, which the trainer preloads by re-executing itself when it is
installed (`preload_tcmalloc`; `DSEXIT_TCMALLOC=off` keeps glibc).
"""

from __future__ import annotations

import ctypes
import os
import sys

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
    from dsexit.train.config import ConfigError

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
_PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # a user's own LD_PRELOAD choice stands


def tcmalloc_choice() -> str:
    """The user's `DSEXIT_TCMALLOC`: "auto" (default), "off", or the path of a tcmalloc library."""
    from dsexit.train.config import ConfigError

    choice = os.environ.get(TCMALLOC_ENV, "auto").strip()
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
    """Re-run this process, same PID and arguments, with tcmalloc preloaded (`LD_PRELOAD`).

    For a CPU training process: its steps allocate and free the same large temporaries, and exit
    training's block sizes change every step. Against the tuned glibc, electra-small exit training (32 x 128
    per step) kept 2-11 points more of its FLOP-ideal speedup, plain ELECTRA ran alike, and each process
    peaked at 2.4-2.5 GiB resident instead of 3.6-5.2 (README, "Exit savings in real training").
    It must be loaded before the interpreter starts, hence the `exec`, before anything else (no
    process group, no MPI, no thread yet). Nothing happens when DSEXIT_TCMALLOC=off, when no tcmalloc is
    installed (Debian/Ubuntu: libtcmalloc-minimal4), or when LD_PRELOAD already names an allocator."""
    choice = tcmalloc_choice()
    if choice == "off" or os.environ.get(_PRELOADED_ENV) or not sys.platform.startswith("linux"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _PRELOADED_ALLOCATORS):
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


def allocator_in_use() -> str:
    """What serves this process's malloc: "tcmalloc", "jemalloc", "mimalloc" (preloaded) or "glibc"."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return "glibc"
    return next((name for name in _PRELOADED_ALLOCATORS if f"lib{name}" in mapped), "glibc")
