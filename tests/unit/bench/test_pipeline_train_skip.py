"""bench/pipeline_train_skip.py: the summary of a run's `pipeline_stages` records, counted by hand."""

import json

from tests.helpers import load_bench

bench = load_bench("pipeline_train_skip")


def _step(step, tau, compute, last_skipped, last_token_layers):
    return {
        "step": step,
        "exit_threshold": tau,
        "compute_fraction": compute,
        "pipeline_stages": [
            {"stage": 0, "micro_batches": 4, "skipped_micro_batches": 0, "token_layers": 100},
            {"stage": 1, "micro_batches": 4, "skipped_micro_batches": last_skipped, "token_layers": last_token_layers},
        ],
    }


def test_summary_counts_the_steps_after_the_warmup_and_skips_eval_records(tmp_path):
    records = [
        _step(1, None, 1.0, 0, 100),  # warmup: left out
        {"kind": "eval", "step": 1, "eval_rtd_loss_uniform": 0.5},
        _step(2, 0.5, 0.25, 4, 0),
        _step(3, 0.6, 0.5, 1, 30),
        _step(4, 0.7, 1.0, 0, 100),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = bench.summarise(str(tmp_path), exit_warmup_steps=1)
    assert summary["steps_after_warmup"] == 3
    assert summary["steps_with_a_skip_on_the_last_stage"] == 2
    assert summary["mean_compute_fraction"] == (0.25 + 0.5 + 1.0) / 3
    assert summary["totals"] == [
        {"stage": 0, "micro_batches": 12, "skipped_micro_batches": 0, "token_layers": 300},
        {"stage": 1, "micro_batches": 12, "skipped_micro_batches": 5, "token_layers": 130},
    ]
