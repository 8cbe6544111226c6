"""Which allocator serves this process's malloc, read from its memory map on every device (the
resolved config records it); tuning it is `dsexit.cpu`'s business, on a CPU only."""

from __future__ import annotations

PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # what LD_PRELOAD may put in glibc's place


def allocator_in_use() -> str:
    """What serves this process's malloc: "tcmalloc", "jemalloc", "mimalloc" (preloaded) or "glibc"."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return "glibc"
    return next((name for name in PRELOADED_ALLOCATORS if f"lib{name}" in mapped), "glibc")
