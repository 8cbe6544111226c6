"""A time budget ends the learning-rate schedule: the last steps of a --max-minutes run decay to ~0."""

from .helpers import TINY, launch


def test_time_budget_run_finishes_its_decay(tmp_path):
    budget = launch(
        "python",
        tmp_path / "budget",
        [
            *TINY,
            "--max-steps",
            "100000",
            "--max-minutes",
            "0.25",
            "--save-interval",
            "100000",
            "--eval-interval",
            "0",
            "--no-export-hf",
        ],
        nproc=1,
    ).check()
    records = budget.metrics
    last = records[max(records)]
    assert max(records) < 100000  # time, not the step count, ended the run
    peak = max(record["lr"] for record in records.values())
    assert peak > 1.5e-3  # the warmup reached (about) the peak of 2e-3
    assert last["lr"] <= 0.05 * peak, (last["lr"], peak)  # and the decay ended with the budget
    middle = records[sorted(records)[len(records) // 2]]
    assert 0.2 * peak < middle["lr"] < 0.8 * peak  # linear in between
