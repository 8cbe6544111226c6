"""This machine's matmul peak: the denominator of every "share of peak" (MFU) the benchmarks report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul of `size` on `device`, with the threads torch has now; the first of
    `repeats + 1` timings is a warm-up. On a GPU each timing covers four products (launch overhead)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    products = 4 if device.type == "cuda" else 1
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / products)
    return 2 * size**3 / best


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_peaks(device: torch.device, size: int) -> dict[str, float]:
    """`matmul_peak` in each precision a benchmark reports a share of ("bf16", "fp32")."""
    return {name: matmul_peak(device, dtype, size) for name, dtype in PRECISIONS.items()}


def device_name(device: str | torch.device) -> str:
    """What ran a benchmark: the GPU's name, or the CPU's model and its usable cores."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "CPU"
