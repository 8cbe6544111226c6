"""The arithmetic of bench/pretrain_vs_exit.py: arms paired with the baseline by seed, intervals over
seeds, time to the baseline's held-out loss on smoothed curves, which arm may be called best."""

import pytest

from tests.helpers import load_bench

bench = load_bench("pretrain_vs_exit")


def _run(
    arm: str,
    seed: int,
    points: list[tuple[float, int, float]],
    compute_fraction: float = 1.0,
    steps_with_exits: int | None = None,
) -> dict:
    """A run summary as summarize_run writes it; `points` are (minutes, step, held-out loss)."""
    minutes, step, loss = points[-1]
    early_exit = arm != "baseline"
    return {
        "arm": arm,
        "seed": seed,
        "early_exit": early_exit,
        "train_minutes": minutes,
        "final_step": step,
        "compute_fraction": compute_fraction,
        "steps_with_exits": (step if early_exit else 0) if steps_with_exits is None else steps_with_exits,
        "final": {
            "eval_rtd_loss_uniform": loss,
            "eval_rtd_auc_uniform": 0.8,
            "rtd_prior_entropy": 0.4,
            "eval_rtd_loss_uniform_exit": loss,
        },
        "curve": [{"minutes": m, "step": s, "rtd_loss_uniform": value} for m, s, value in points],
    }


BASELINE = [(0.0, 0, 0.40), (1.0, 100, 0.30), (2.0, 200, 0.26)]  # final 0.26, reached at 2.0 minutes
OFFSETS = [0.0, 0.01, -0.01, 0.015, -0.015]  # how much worse each seed's exit run is than the common shape


def _exit_run(seed: int, offset: float, arm: str = "exit-0.50", compute_fraction: float = 0.5) -> dict:
    # 20% more steps in the same minutes; 0.28 + offset at 1 minute, 0.24 + offset at 2
    points = [(0.0, 0, 0.40), (1.0, 120, 0.28 + offset), (2.0, 240, 0.24 + offset)]
    return _run(arm, seed, points, compute_fraction=compute_fraction)


def _five_seeds(**exit_options) -> list[dict]:
    return [_run("baseline", seed, BASELINE) for seed in range(5)] + [
        _exit_run(seed, offset, **exit_options) for seed, offset in enumerate(OFFSETS)
    ]


def test_five_paired_seeds_give_differences_and_intervals_worked_by_hand():
    arm = bench.compare(_five_seeds())["arms"]["exit-0.50"]
    # Matched step 200 (the baseline's last): the arm at 0.28 + o - 0.04 x 80/120, the baseline at 0.26.
    per_seed = [pair["delta_at_matched_step"] for pair in arm["paired_seeds"]]
    assert per_seed == pytest.approx([0.28 - 0.04 * 80 / 120 + offset - 0.26 for offset in OFFSETS])
    # Matched minutes 2.0: 0.24 + o against 0.26; mean -0.02, sd(offsets) = sqrt(6.5e-4 / 4), se
    # sqrt(1.625e-4 / 5), t(0.975, 4) = 2.776445: half width 0.015828.
    minutes = arm["delta_at_matched_minutes"]
    assert minutes["values"] == pytest.approx([-0.02 + offset for offset in OFFSETS])
    assert minutes["mean"] == pytest.approx(-0.02)
    assert (minutes["low"], minutes["high"]) == pytest.approx((-0.02 - 0.015828, -0.02 + 0.015828), abs=1e-5)
    assert minutes["resolved"] and arm["heldout_rtd_delta"] == pytest.approx(-0.02)
    # Time to 0.26: 1 + (0.02 + o) / 0.04 minutes against the baseline's 2.0: saved 25, 12.5, 37.5, 6.25,
    # 43.75 %; mean 25, deviations 0, +-12.5, +-18.75 -> sd sqrt(1015.625 / 4), half width
    # 2.776445 x sd / sqrt(5) = 19.7852.
    saved = arm["time_saved_pct"]
    assert saved["values"] == pytest.approx([25.0, 12.5, 37.5, 6.25, 43.75])
    assert (saved["low"], saved["high"]) == pytest.approx((25 - 19.7852, 25 + 19.7852), abs=1e-3)
    assert saved["resolved"] and arm["reached_all"]


def test_the_result_line_names_the_best_arm_its_interval_and_resolution():
    line = bench.result_line(bench.compare(_five_seeds()))
    assert line == (
        "RESULT pretrain_vs_exit time_saved_pct=25.0 ci_low=5.2 ci_high=44.8 heldout_rtd_delta=-0.0200 "
        "seeds=5 resolved=yes best_arm=exit-0.50"
    )


def test_with_three_seeds_there_is_no_interval_and_nothing_is_resolved():
    runs = [run for run in _five_seeds() if run["seed"] < 3]
    comparison = bench.compare(runs)
    assert comparison["arms"]["exit-0.50"]["time_saved_pct"]["mean"] == pytest.approx((25 + 12.5 + 37.5) / 3)
    assert bench.result_line(comparison) == (
        "RESULT pretrain_vs_exit time_saved_pct=25.0 ci_low=n/a ci_high=n/a heldout_rtd_delta=-0.0200 "
        "seeds=3 resolved=no best_arm=exit-0.50"
    )
    assert "[n/a]" in bench.format_table(comparison)


def test_best_arm_only_among_arms_whose_exits_ran():
    runs = _five_seeds()
    # Faster than exit-0.50 on every seed, but its runs ended inside the exit warmup.
    for seed in range(5):
        never = _exit_run(seed, -0.03, arm="exit-0.75", compute_fraction=1.0)
        never["steps_with_exits"] = 0
        runs.append(never)
        runs.append(_exit_run(seed, -0.02, arm="exit-0.50-conf", compute_fraction=0.99))  # exits barely ran
    comparison = bench.compare(runs)
    arms = comparison["arms"]
    assert arms["exit-0.75"]["exit_states"] == ["never started"] * 5 and not arms["exit-0.75"]["exits_ran"]
    assert arms["exit-0.50-conf"]["exit_states"] == ["did not exit"] * 5
    assert arms["exit-0.75"]["time_saved_pct"]["mean"] > arms["exit-0.50"]["time_saved_pct"]["mean"]
    assert comparison["best_exit_arm"] == "exit-0.50"
    table = bench.format_table(comparison)
    assert any(line.startswith("exit-0.75") and "never started" in line for line in table.splitlines())
    assert any(line.startswith("exit-0.50-conf") and "did not exit" in line for line in table.splitlines())


def test_no_arm_whose_exits_ran_gives_no_best_arm():
    runs = [run for run in _five_seeds() if run["arm"] == "baseline"]
    runs += [_exit_run(seed, 0.0, compute_fraction=1.0) | {"steps_with_exits": 0} for seed in range(5)]
    comparison = bench.compare(runs)
    assert comparison["best_exit_arm"] is None
    assert bench.result_line(comparison).endswith("seeds=0 resolved=no best_arm=none")


def test_time_to_target_reads_the_smoothed_curve_not_a_lucky_dip():
    baseline = _run("baseline", 1, [(0.0, 0, 0.40), (1.0, 100, 0.30), (2.0, 200, 0.32), (3.0, 300, 0.25)])
    # Raw, this arm dips to 0.24 at 1 minute; its non-increasing fit pools 0.24 and 0.30 to 0.27 and
    # ends at 0.26, so it never reaches 0.25: the fit's last third falls 0.01 a minute -> 4.0 minutes.
    dip = _run("exit-0.50", 1, [(0.0, 0, 0.40), (1.0, 120, 0.24), (2.0, 240, 0.30), (3.0, 360, 0.26)], 0.5)
    pair = bench.paired_with_baseline(dip, baseline)
    assert pair["target_rtd_loss"] == pytest.approx(0.25) and pair["baseline_minutes_to_target"] == pytest.approx(3.0)
    assert not pair["reached"] and pair["minutes_to_target"] == pytest.approx(4.0)
    assert pair["time_saved_pct"] == pytest.approx(100 * (1 - 4.0 / 3.0))
    # Matched step 300: the arm between 240 (0.30) and 360 (0.26) at 0.28, the baseline at 0.25.
    assert pair["delta_at_matched_step"] == pytest.approx(0.03)
    assert pair["delta_at_matched_minutes"] == pytest.approx(0.01)


def test_baseline_target_is_its_own_smoothed_final_loss_reached_where_its_fit_first_gets_there():
    # 0.25, 0.125, 0.375 at the end fit to 0.25, 0.25, 0.25: the target is 0.25, first reached at 4 minutes
    points = [(0.0, 0, 0.5), (2.0, 100, 0.375), (4.0, 200, 0.25), (5.0, 250, 0.125), (6.0, 300, 0.375)]
    baseline = _run("baseline", 1, points)
    pair = bench.paired_with_baseline(baseline, baseline)
    assert pair["target_rtd_loss"] == 0.25
    assert pair["baseline_minutes_to_target"] == pytest.approx(4.0) and pair["time_saved_pct"] == pytest.approx(0.0)


def test_time_to_reach_loss_interpolates_and_reports_never():
    curve = [(0.0, 0.5), (10.0, 0.4), (20.0, 0.2)]
    assert bench.time_to_reach_loss(curve, 0.3) == pytest.approx(15.0)
    assert bench.time_to_reach_loss(curve, 0.6) == 0.0
    assert bench.time_to_reach_loss(curve, 0.1) is None


def test_extrapolation_continues_the_last_third_and_caps_a_flat_curve_at_twice_the_budget():
    falling = [(0.0, 0.40), (4.0, 0.33), (6.0, 0.31), (8.0, 0.29), (10.0, 0.27)]  # 0.01 a minute at the end
    assert bench.extrapolated_time(falling, 0.25) == pytest.approx(12.0)
    assert bench.extrapolated_time([(0.0, 0.40), (5.0, 0.30), (10.0, 0.30)], 0.25) == pytest.approx(20.0)


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


def test_short_runs_log_training_records_at_least_as_often_as_they_evaluate(tmp_path):
    """The exit count comes from the training records; a dry run of a few dozen steps must have some."""
    dry = {**bench.SCALES["device"], **bench.DRY_RUN}
    run = bench.Run(bench.ARMS[2], 1234, tmp_path)
    command = bench.trainer_command(run, dry, tmp_path, "mlm")
    assert command[command.index("--log-interval") + 1] == str(dry["eval_interval"]) == "10"
    quick = bench.trainer_command(run, bench.SCALES["quick"], tmp_path, "uniform")
    assert quick[quick.index("--log-interval") + 1] == "50"


def _routed(arm: str, seed: int, full: float, exit_rule: float, compute: float, step: int = 400) -> dict:
    run = _run(arm, seed, [(0.0, 0, 0.40), (1.0, step, full)], compute_fraction=compute)
    run["final"]["eval_rtd_loss_uniform_exit"] = exit_rule
    run["curve"][-1]["compute_fraction"] = compute - 0.01  # on the held-out samples
    return run


def test_routings_are_paired_by_seed_at_each_target_with_intervals_from_three_seeds():
    # capacity's exit-rule loss is lower than threshold's by 0.010, 0.012, 0.014 (mean 0.012, sd 0.002,
    # t(0.975, 2) = 4.302653: half width 4.302653 x 0.002 / sqrt(3) = 0.004968); random's is higher than
    # capacity's by 0.02 +- 0.001; full depth differs by 0.001 each seed (zero spread)
    runs = []
    for seed, gap in enumerate((0.010, 0.012, 0.014)):
        runs += [
            _routed("baseline", seed, 0.30, 0.30, 1.0),
            _routed("exit-0.50", seed, 0.301, 0.33, 0.52),
            _routed("capacity-0.50", seed, 0.302, 0.33 - gap, 0.50),
            _routed("random-0.50", seed, 0.303, 0.33 - gap + 0.02 + 0.001 * (seed - 1), 0.50),
        ]
    rows = bench.routing_comparison(runs)["routing"]
    assert [(row["target"], row["arms"]) for row in rows] == [
        (0.5, ["capacity", "threshold"]),
        (0.5, ["random", "threshold"]),
        (0.5, ["random", "capacity"]),
    ]
    capacity = rows[0]["delta_exit_rule"]
    assert capacity["values"] == pytest.approx([-0.010, -0.012, -0.014])
    assert (capacity["low"], capacity["high"]) == pytest.approx((-0.012 - 0.004968, -0.012 + 0.004968), abs=1e-6)
    assert capacity["resolved"] and rows[0]["delta_full_depth"]["mean"] == pytest.approx(0.001)
    assert rows[0]["delta_compute"]["mean"] == pytest.approx(-0.02) and rows[0]["matched_step"] == 400
    assert rows[0]["exit_rule_compute"] == pytest.approx([0.49, 0.51])
    assert " 0.490/0.510 " in bench.format_routing(rows)
    assert rows[2]["delta_exit_rule"]["mean"] == pytest.approx(0.02) and rows[2]["delta_exit_rule"]["resolved"]
    [line] = bench.routing_result_lines(rows)
    assert line.startswith(
        "RESULT routing_quality target=0.50 seeds=3 capacity_minus_threshold=-0.0120 [-0.0170,-0.0070] resolved=yes"
    )
    assert "random_minus_capacity=+0.0200" in line
    assert bench.routing_comparison([run for run in runs if not run["arm"].startswith(("capacity", "random"))]) == {}


def test_the_exit_rule_is_compared_only_where_both_runs_ended_at_the_same_step():
    runs = [
        _routed("exit-0.75", 0, 0.30, 0.31, 0.75, step=400),
        _routed("capacity-0.75", 0, 0.30, 0.30, 0.75, step=380),
    ]
    [row] = bench.routing_comparison(runs)["routing"]
    assert row["matched_step"] == 380 and row["delta_exit_rule"]["n"] == 0 and row["delta_full_depth"]["n"] == 1


def test_concurrent_runs_are_worlds_of_one_on_ports_of_their_own(monkeypatch, tmp_path):
    """A launcher's variables left in the benchmark's environment (MASTER_PORT above all) would send two
    runs started together to one rendezvous port: each run gets none of them and a port of its own."""
    started = []

    class Finished:
        returncode = 0

        def __init__(self, command, env, **_):
            started.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(bench.subprocess, "Popen", Finished)
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: None)
    for name, value in (("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    arm = bench.Arm("baseline", ["--no-exit"], False)
    runs = [bench.Run(arm, seed, tmp_path / f"seed{seed}") for seed in (1, 2, 3)]
    scale = {"concurrency": 3, "threads": 1, "minutes": 0.1, "model": "electra-tiny"}
    monkeypatch.setattr(bench, "trainer_command", lambda *args: ["true"])
    bench.pretrain_all(runs, scale, tmp_path / "data", "mlm")
    assert len(started) == 3
    assert all("RANK" not in env and "WORLD_SIZE" not in env and "LOCAL_RANK" not in env for env in started)
    ports = [env["MASTER_PORT"] for env in started]
    assert len(set(ports)) == 3 and "29500" not in ports, ports
