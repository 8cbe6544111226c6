"""The matmul peak the benchmarks divide by: FLOPs of the product over its best time."""

import torch

from dsexit.eval import peak


def test_peak_is_the_products_flops_over_its_best_time(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 10.5, 20.0, 21.0])  # three timings: 2 s, 0.5 s, 1 s
    monkeypatch.setattr(peak.time, "perf_counter", lambda: next(clock))
    assert peak.matmul_peak(torch.device("cpu"), torch.float32, 64, repeats=2) == 2 * 64**3 / 0.5


def test_peaks_are_measured_in_bf16_and_fp32(monkeypatch):
    measured = []
    monkeypatch.setattr(peak, "matmul_peak", lambda device, dtype, size: measured.append(dtype) or float(len(measured)))
    assert peak.matmul_peaks(torch.device("cpu"), 64) == {"bf16": 1.0, "fp32": 2.0}
    assert measured == [torch.bfloat16, torch.float32]
