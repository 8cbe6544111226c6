"""The arithmetic of bench/pretrain_vs_exit.py: time to the baseline's held-out quality, gaps, seeds."""

import pytest

from tests.helpers import load_bench

bench = load_bench("pretrain_vs_exit")


def _run(arm: str, seed: int, early_exit: bool, curve: list[tuple[float, float]]) -> dict:
    minutes, loss = curve[-1]
    return {
        "arm": arm,
        "seed": seed,
        "early_exit": early_exit,
        "train_minutes": minutes,
        "final_step": 100,
        "compute_fraction": 0.5 if early_exit else 1.0,
        "final": {
            "eval_rtd_loss_uniform": loss,
            "eval_rtd_auc_uniform": 0.8,
            "rtd_prior_entropy": 0.4,
            "eval_rtd_loss_uniform_exit": loss,
        },
        "curve": [{"minutes": m, "rtd_loss_uniform": value} for m, value in curve],
    }


def test_exit_arm_that_reaches_the_baseline_sooner_saves_that_share_of_time():
    comparison = bench.compare(
        [
            _run("baseline", 1, False, [(0.0, 0.40), (5.0, 0.30), (10.0, 0.24)]),
            _run("baseline", 2, False, [(0.0, 0.40), (5.0, 0.30), (10.0, 0.26)]),  # target: mean 0.25
            _run("exit-0.50", 1, True, [(0.0, 0.40), (5.0, 0.27), (10.0, 0.23)]),  # 0.25 at 7.5 min
            _run("exit-0.50", 2, True, [(0.0, 0.40), (5.0, 0.25), (10.0, 0.22)]),  # 0.25 at 5.0 min
        ]
    )
    assert comparison["target_rtd_loss"] == pytest.approx(0.25)
    arm = comparison["arms"]["exit-0.50"]
    assert arm["minutes_to_target"]["values"] == pytest.approx([7.5, 5.0])
    # The baseline's own time to its mean final loss: seed 1 at 5 + 5 x 0.05 / 0.06, seed 2 never
    # (its last third falls 0.04 in 5 min: 0.26 -> 0.25 takes 1.25 min more).
    base = comparison["baseline_minutes"]
    assert base == pytest.approx(((5 + 5 * 0.05 / 0.06) + 11.25) / 2)
    assert arm["time_saved_pct"] == pytest.approx(100 * (1 - 6.25 / base))
    assert arm["time_saved_pct_per_seed"] == pytest.approx([100 * (1 - 7.5 / base), 100 * (1 - 5.0 / base)])
    assert arm["heldout_rtd_delta"] == pytest.approx(0.225 - 0.25)
    assert arm["reached_all"] and comparison["best_exit_arm"] == "exit-0.50"


def test_an_arm_that_never_reaches_the_target_gets_a_number_and_its_gap():
    comparison = bench.compare(
        [
            _run("baseline", 1, False, [(0.0, 0.40), (5.0, 0.30), (10.0, 0.25)]),
            # still falling by 0.01 a minute over its last third: 0.27 -> 0.25 takes 2 more minutes
            _run("exit-0.75", 1, True, [(0.0, 0.40), (4.0, 0.33), (6.0, 0.31), (8.0, 0.29), (10.0, 0.27)]),
            _run("exit-0.50", 1, True, [(0.0, 0.40), (5.0, 0.30), (10.0, 0.30)]),  # flat: counted as twice the budget
        ]
    )
    slow, flat = comparison["arms"]["exit-0.75"], comparison["arms"]["exit-0.50"]
    assert not slow["reached_all"] and slow["minutes_to_target"]["mean"] == pytest.approx(12.0)
    assert comparison["baseline_minutes"] == pytest.approx(10.0)  # the baseline reaches its final loss at the end
    assert slow["time_saved_pct"] == pytest.approx(-20.0)
    assert slow["heldout_rtd_delta"] == pytest.approx(0.02)
    assert flat["time_saved_pct"] == pytest.approx(-100.0)
    assert comparison["best_exit_arm"] == "exit-0.75"


def test_time_to_reach_loss_interpolates_and_reports_never():
    curve = [(0.0, 0.5), (10.0, 0.4), (20.0, 0.2)]
    assert bench.time_to_reach_loss(curve, 0.3) == pytest.approx(15.0)
    assert bench.time_to_reach_loss(curve, 0.6) == 0.0
    assert bench.time_to_reach_loss(curve, 0.1) is None


def _train_records(steps: int, warmup: int, interval: int = 10, with_counts: bool = True) -> list[dict]:
    """metrics.jsonl training records of a run of `steps` steps whose exits start at step `warmup`."""
    records = []
    for end in range(interval, steps + 1, interval):
        on = max(0, end - max(warmup, end - interval))
        record = {"step": end, "steps": interval, "exit_threshold": 0.5 if end > warmup else None}
        if with_counts:
            record["steps_with_exits"] = on
        records.append(record)
    return records


def test_steps_with_exits_counts_from_the_metrics_records():
    assert bench.steps_with_exits(_train_records(100, warmup=35)) == (65, 100)
    # Older records without the count: an interval counts when its last step had a tau.
    assert bench.steps_with_exits(_train_records(100, warmup=35, with_counts=False)) == (70, 100)
    assert bench.steps_with_exits([]) == (0, 0)


def _exit_summary(arm: str, seed: int, early_exit: bool, steps: int, warmup: int) -> dict:
    on, run = bench.steps_with_exits(_train_records(steps, warmup))
    return {"arm": arm, "seed": seed, "early_exit": early_exit, "steps_with_exits": on, "steps_run": run}


def test_a_comparison_is_refused_when_an_exit_arm_ran_mostly_without_exits(capsys):
    fine = [
        _exit_summary("baseline", 1, False, 200, warmup=200),  # no exits at all, and no exit arm
        _exit_summary("exit-0.75", 1, True, 210, warmup=70),  # exactly 2/3 with exits
        _exit_summary("exit-0.50", 1, True, 300, warmup=50),
    ]
    assert bench.exit_share_shortfalls(fine) == []
    assert not bench.refuse_comparison(fine)
    short = fine + [_exit_summary("exit-0.50", 2, True, 200, warmup=80)]  # 120 of 200: 60%
    (line,) = bench.exit_share_shortfalls(short)
    assert line.startswith("exit-0.50 seed 2: exits were on for 120 of its 200 steps (60%)")
    assert bench.refuse_comparison(short)
    printed = capsys.readouterr().out
    assert "no comparison published" in printed and "RESULT" not in printed
    # The first device run: exits after 200 of ~205 steps.
    assert bench.exit_share_shortfalls([_exit_summary("exit-0.75", 1, True, 210, warmup=200)])


def test_the_device_scale_warms_up_exits_for_a_share_of_its_expected_steps():
    scale = bench.SCALES["device"]
    warmup = bench.exit_warmup_steps(scale)
    expected = scale["minutes"] * scale["steps_per_minute"]
    assert warmup == round(scale["exit_warmup_share"] * expected)
    assert expected - warmup >= bench.MIN_EXIT_SHARE * expected  # at the expected speed, exits on for 2/3
    assert bench.exit_warmup_steps({**scale, "minutes": 2 * scale["minutes"]}) == round(
        2 * expected * scale["exit_warmup_share"]
    )
    assert bench.exit_warmup_steps(bench.SCALES["quick"]) == bench.SCALES["quick"]["exit_warmup_steps"]
