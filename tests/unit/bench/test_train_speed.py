"""bench/train_speed.py: the RESULT line's ratios from the parts' measurements, worked by hand, and
the trainer's tokens/s read from metrics.jsonl records weighted by their time."""

import argparse

import pytest

from tests.helpers import load_bench

bench = load_bench("train_speed")


def test_ratios_compare_the_faster_loop_with_its_own_bare_step_and_eager_hf():
    args = argparse.Namespace(device="cpu", preset="smoke")
    parts = {
        "loop-off": {"tokens_per_s": 900.0},
        "bare-off": {"tokens_per_s": 1000.0, "seconds_per_step": 4.0, "training_flops_per_step": 8e12},
        "hf-off": {"tokens_per_s": 600.0},
        "loop-on": {"tokens_per_s": 1200.0},
        "bare-on": {"tokens_per_s": 1250.0, "seconds_per_step": 3.2, "training_flops_per_step": 8e12},
        "hf-on": {"tokens_per_s": 800.0},
    }
    results = bench.summarize(args, parts, peak_bf16=1e13, peak_fp32=5e12)
    assert results["tokens_per_s"] == 1200.0 and results["loop_compile"] == "on"
    assert results["loop_vs_bare"] == pytest.approx(1200 / 1250)
    assert results["compiled_vs_eager"] == pytest.approx(1200 / 900)
    assert results["vs_hf_same_work"] == pytest.approx(1200 / 600)
    assert results["vs_hf_same_work_compiled"] == pytest.approx(1200 / 800)
    flops_per_token = 8e12 / 4000  # 4000 tokens per step at either compile setting
    assert results["peak_share_bf16"] == pytest.approx(1200 * flops_per_token / 1e13)
    assert results["peak_share_fp32"] == pytest.approx(1200 * flops_per_token / 5e12)


def test_missing_parts_give_no_ratio():
    args = argparse.Namespace(device="cpu", preset="smoke")
    results = bench.summarize(args, {"loop-off": {"tokens_per_s": 900.0}}, peak_bf16=None)
    assert results["tokens_per_s"] == 900.0
    assert results["loop_vs_bare"] is None and results["compiled_vs_eager"] is None
    assert results["peak_share_bf16"] is None
