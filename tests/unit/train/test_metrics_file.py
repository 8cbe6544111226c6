"""metrics.jsonl on resume: records past the resumed step (training and held-out) are dropped, so the
file reads as one history; only rank 0 writes it."""

from __future__ import annotations

import contextlib
import json
import logging

from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.heldout import EVAL_FIELDS
from dsexit.train.metrics import METRICS_FILE, MetricsLogger, read_metrics
from dsexit.train.step_stats import StepSummary

MAIN = WorldInfo(0, 1, 0, 1, "single")


def _summary(loss: float) -> StepSummary:
    return StepSummary(
        generator_loss=loss / 2,
        discriminator_loss=loss / 2,
        loss=loss,
        rtd_accuracy=0.5,
        compute_fraction=1.0,
        exit_layer_counts=[0, 0, 4],
        real_tokens=4,
        samples_digest="ab" * 8,
        stop_preempted=False,
        stop_time_limit=False,
    )


def _logger(run_dir, start_step: int, world: WorldInfo = MAIN) -> MetricsLogger:
    return MetricsLogger(str(run_dir), world, total_steps=10, start_step=start_step, log_interval=1, progress="lines")


def _train(logger: MetricsLogger, steps) -> None:
    for step in steps:
        logger.record(
            step,
            _summary(float(step)),
            exit_threshold=None,
            lr=1e-3,
            seconds=0.1,
            data_wait_seconds=0.0,
            samples_seen=8 * step,
            tokens_seen=32 * step,
        )


def _history(run_dir) -> list[tuple[str, int]]:
    return [(record.get("kind", "train"), record["step"]) for record in read_metrics(str(run_dir), "all")]


def test_resume_drops_the_records_past_its_step_and_continues_one_history(tmp_path):
    first = _logger(tmp_path, start_step=0)
    _train(first, range(1, 7))
    first.record_eval(4, dict.fromkeys(EVAL_FIELDS, 0.3), exit_threshold=None)
    first.record_eval(6, dict.fromkeys(EVAL_FIELDS, 0.2), exit_threshold=None)
    first.close()
    # Killed after step 6; the newest checkpoint is step 4.
    resumed = _logger(tmp_path, start_step=4)
    assert _history(tmp_path) == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    _train(resumed, range(5, 8))
    resumed.close()
    assert [step for _, step in _history(tmp_path)] == [1, 2, 3, 4, 4, 5, 6, 7]
    assert [record["loss"] for record in read_metrics(str(tmp_path))] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_fresh_start_empties_the_file_and_other_ranks_leave_it_alone(tmp_path):
    logger = _logger(tmp_path, start_step=0)
    _train(logger, range(1, 4))
    logger.close()
    before = (tmp_path / METRICS_FILE).read_text()
    other_rank = _logger(tmp_path, start_step=0, world=WorldInfo(1, 2, 1, 2, "env"))
    _train(other_rank, range(1, 4))
    assert (tmp_path / METRICS_FILE).read_text() == before
    _logger(tmp_path, start_step=0).close()
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_every_line_is_one_json_record(tmp_path):
    logger = _logger(tmp_path, start_step=0)
    _train(logger, range(1, 3))
    logger.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _logged_steps(run_dir):
    """A rank-0 logger for `run_dir` and the metrics lines it logs (the `step=` lines, once it closes)."""
    dsexit_log, lines = logging.getLogger("dsexit"), _Lines()
    level = dsexit_log.level
    dsexit_log.addHandler(lines)
    dsexit_log.setLevel(logging.INFO)
    logger, step_lines = _logger(run_dir, start_step=0), []
    try:
        yield logger, step_lines
    finally:
        logger.close()
        dsexit_log.removeHandler(lines)
        dsexit_log.setLevel(level)
        step_lines += [line for line in lines.lines if line.startswith("step=")]


def _record(logger, step: int, summary: StepSummary, **exits) -> None:
    logger.record(
        step,
        summary,
        lr=1e-3,
        seconds=0.1,
        data_wait_seconds=0.0,
        samples_seen=8 * step,
        tokens_seen=32 * step,
        **exits,
    )


def test_tau_at_the_floor_is_in_the_record_and_the_log_line(tmp_path):
    with _logged_steps(tmp_path) as (logger, step_lines):
        for step, at_floor in ((1, False), (2, True)):
            _record(logger, step, _summary(1.0), exit_threshold=0.25, tau_at_floor=at_floor)
    assert [record["tau_at_floor"] for record in read_metrics(str(tmp_path))] == [False, True]
    assert ["tau at floor" in line for line in step_lines] == [False, True]


def test_each_record_counts_its_steps_with_exits_on(tmp_path):
    logger = MetricsLogger(str(tmp_path), MAIN, total_steps=6, start_step=0, log_interval=3, progress="lines")
    for step, tau in zip(range(1, 7), (None, None, 0.9, 0.8, 0.7, 0.7)):  # exits start at the third step
        logger.record(
            step,
            _summary(1.0),
            exit_threshold=tau,
            lr=1e-3,
            seconds=0.1,
            data_wait_seconds=0.0,
            samples_seen=8 * step,
            tokens_seen=32 * step,
        )
    logger.close()
    assert [(r["steps"], r["steps_with_exits"]) for r in read_metrics(str(tmp_path))] == [(3, 1), (3, 3)]


def test_capacity_routing_records_its_level_the_forced_share_and_why_the_floor_holds_it(tmp_path):
    with _logged_steps(tmp_path) as (logger, step_lines):
        for step, (capacity, at_floor, forced) in enumerate(((None, False, 0.0), (12, False, 0.1), (16, True, 0.0)), 1):
            summary = _summary(1.0)
            summary.forced_exit_share = forced
            _record(logger, step, summary, exit_threshold=None, exit_capacity=capacity, capacity_at_floor=at_floor)
    records = read_metrics(str(tmp_path))
    assert [r["capacity_level"] for r in records] == [None, 12, 16]
    assert [r["forced_exit_share"] for r in records] == [0.0, 0.1, 0.0]
    assert [r["capacity_at_floor"] for r in records] == [False, False, True]
    assert [r["steps_with_exits"] for r in records] == [0, 1, 1]
    assert "capacity=12/16 forced=0.100" in step_lines[1]
    assert ["capacity held by the floor" in line for line in step_lines] == [False, False, True]
