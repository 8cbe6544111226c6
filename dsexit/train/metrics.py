"""Reporting: rank 0 speaks; a progress bar on a terminal, key=value lines otherwise.

Owns the run's logs and metrics files:
    RUN_DIR/train.log       rank 0's log (every metrics line, even when a bar is shown)
    RUN_DIR/metrics.jsonl   one record per log interval: losses, RTD accuracy, exit-layer
                            histogram, compute fraction, tau or the capacity level (and whether
                            the controller's floor held it), the share of tokens capacity
                            routing forced out below the floor, steps with exits on, lr,
                            tokens/s, data wait,
                            and a digest of the samples seen (world-size independent);
                            and one `"kind": "eval"` record per held-out evaluation
                            (`dsexit.train.heldout`), its baselines beside it
    RUN_DIR/monitor/        DeepSpeed's TensorBoard and CSV monitors (the same scalars)
On resume, records past the resumed step are dropped from metrics.jsonl, so it always
reads as one history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from dsexit.model.capacity import LEVELS
from dsexit.model.flops import mean_exit_layer
from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.step_stats import StepSummary

log = logging.getLogger("dsexit")

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
_LINE_KEYS = (
    ("generator_loss", "gen_loss", "{:.4f}"),
    ("discriminator_loss", "disc_loss", "{:.4f}"),
    ("rtd_accuracy", "rtd_acc", "{:.4f}"),
    ("mean_exit_layer", "exit_layer", "{:.2f}"),
    ("compute_fraction", "compute", "{:.3f}"),
    ("exit_threshold", "tau", "{:.4f}"),
    ("capacity_level", "capacity", "{}/" + str(LEVELS)),
    ("forced_exit_share", "forced", "{:.3f}"),
    ("tokens_per_s", "tokens_per_s", "{:.0f}"),
    ("data_wait_pct", "data_wait_pct", "{:.1f}"),
    ("lr", "lr", "{:.3e}"),
)


def setup_logging(world: WorldInfo, run_dir: str | None) -> None:
    """Rank 0 logs INFO to stdout and RUN_DIR/train.log; other ranks only warnings."""
    logger = logging.getLogger("dsexit")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if world.is_main else logging.WARNING)
    formatter = logging.Formatter(f"%(asctime)s [dsexit rank {world.rank}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if world.is_main and run_dir:
        os.makedirs(run_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(run_dir, LOG_FILE))
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    try:  # DeepSpeed's INFO chatter would drown ours; its warnings still show
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def read_metrics(run_dir: str, kind: str = "train") -> list[dict]:
    """The records of one kind: "train" (per log interval), "eval" (held-out), or "all"."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return records if kind == "all" else [record for record in records if record.get("kind", "train") == kind]


@dataclass
class _Interval:
    steps: int = 0
    steps_with_exits: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    exit_layer_counts: list[int] = field(default_factory=list)
    real_tokens: int = 0
    seconds: float = 0.0
    data_wait_seconds: float = 0.0
    digest: str = ""
    stage_counters: list[list[int]] | None = None


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        world: WorldInfo,
        *,
        total_steps: int,
        start_step: int,
        log_interval: int,
        progress: str,
        monitor=None,
    ):
        self.world, self.total_steps, self.log_interval, self.monitor = world, total_steps, log_interval, monitor
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.interval = _Interval()
        self.bar = None
        if not world.is_main:
            return
        kept = [record for record in read_metrics(run_dir, "all") if record["step"] <= start_step]
        with open(self.path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)
        use_bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        if use_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm([log])  # other log lines print above the bar, not into it
            self._redirect.__enter__()

    def record(
        self,
        step: int,
        summary: StepSummary,
        *,
        exit_threshold: float | None,
        tau_at_floor: bool = False,
        exit_capacity: int | None = None,
        capacity_at_floor: bool = False,
        lr: float,
        seconds: float,
        data_wait_seconds: float,
        samples_seen: int,
        tokens_seen: int,
    ) -> None:
        """Account one finished step; rank 0 reports at every log interval and at the last step."""
        if not self.world.is_main:
            return
        interval = self.interval
        interval.steps += 1
        interval.steps_with_exits += exit_threshold is not None or exit_capacity is not None
        for name in (
            "generator_loss",
            "discriminator_loss",
            "loss",
            "rtd_accuracy",
            "compute_fraction",
            "forced_exit_share",
        ):
            interval.sums[name] = interval.sums.get(name, 0.0) + getattr(summary, name)
        counts = summary.exit_layer_counts
        interval.exit_layer_counts = [a + b for a, b in zip(interval.exit_layer_counts or [0] * len(counts), counts)]
        interval.real_tokens += summary.real_tokens
        interval.seconds += seconds
        interval.data_wait_seconds += data_wait_seconds
        interval.digest = hashlib.blake2b(
            (interval.digest + summary.samples_digest).encode(), digest_size=8
        ).hexdigest()
        if summary.stage_counters is not None:
            previous = interval.stage_counters or [[0, 0, 0] for _ in summary.stage_counters]
            interval.stage_counters = [
                [a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(previous, summary.stage_counters)
            ]
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_interval == 0 or step >= self.total_steps:
            floors = {"tau_at_floor": tau_at_floor, "capacity_at_floor": capacity_at_floor}
            self._flush(step, exit_threshold, exit_capacity, floors, lr, samples_seen, tokens_seen)

    def _flush(
        self,
        step: int,
        exit_threshold: float | None,
        exit_capacity: int | None,
        floors: dict[str, bool],
        lr: float,
        samples_seen: int,
        tokens_seen: int,
    ) -> None:
        interval, self.interval = self.interval, _Interval()
        counts = interval.exit_layer_counts
        record = {name: total / interval.steps for name, total in interval.sums.items()}
        record.update(
            step=step,
            steps=interval.steps,
            steps_with_exits=interval.steps_with_exits,
            exit_threshold=exit_threshold,
            capacity_level=exit_capacity,
            **floors,
            lr=lr,
            mean_exit_layer=mean_exit_layer(counts),
            exit_layer_counts=counts,
            tokens_per_s=interval.real_tokens / max(interval.seconds, 1e-9),
            data_wait_pct=100.0 * interval.data_wait_seconds / max(interval.seconds, 1e-9),
            samples_digest=interval.digest,
            samples_seen=samples_seen,
            tokens_seen=tokens_seen,
            time=time.time(),
        )
        if interval.stage_counters is not None:
            record["pipeline_stages"] = [
                {
                    "stage": stage,
                    "micro_batches": micro_batches,
                    "skipped_micro_batches": skipped,
                    "token_layers": token_layers,
                }
                for stage, (micro_batches, skipped, token_layers) in enumerate(interval.stage_counters)
            ]
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        line = " ".join(
            [f"step={step}/{self.total_steps}"]
            + [
                f"{short}={'none' if record[key] is None else fmt.format(record[key])}"
                for key, short, fmt in _LINE_KEYS
            ]
        )
        if interval.stage_counters is not None:
            line += " skipped=" + ",".join(
                f"{skipped}/{micro_batches}" for micro_batches, skipped, _ in interval.stage_counters
            )
        if floors["tau_at_floor"]:
            line += " | tau at floor: the exit heads are not confident enough to reach the target compute"
        if floors["capacity_at_floor"]:
            line += (
                " | capacity held by the floor: too few tokens reach min_confidence at the exit heads for the "
                "target compute"
            )
        if self.bar is not None:
            self.bar.set_postfix_str(line.split(" ", 1)[1], refresh=True)
            for handler in log.handlers:  # the bar owns the terminal; the file still gets every line
                if isinstance(handler, logging.FileHandler):
                    handler.emit(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))
        else:
            log.info(line)
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events(
                [(f"Train/{key}", float(record[key]), step) for key, _, _ in _LINE_KEYS if record[key] is not None]
                + [("Train/loss", record["loss"], step)]
            )

    def record_eval(
        self, step: int, results: dict[str, float], *, exit_threshold: float | None, exit_capacity: int | None = None
    ) -> None:
        """One held-out evaluation: a metrics.jsonl record, a log line, monitor scalars (rank 0)."""
        if not self.world.is_main:
            return
        record = {"kind": "eval", "step": step, "exit_threshold": exit_threshold, "time": time.time(), **results}
        if exit_capacity is not None:
            record["capacity_level"] = exit_capacity
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        line = (
            f"eval step={step} rtd_loss_uniform={results['eval_rtd_loss_uniform']:.4f} "
            f"(prior {results['rtd_prior_entropy']:.4f}) auc_uniform={results['eval_rtd_auc_uniform']:.4f} "
            f"rtd_loss_generator={results['eval_rtd_loss_generator']:.4f} "
            f"mlm_loss={results['eval_mlm_loss']:.4f} (unigram {results['unigram_entropy']:.4f}) "
            f"exit: rtd_loss={results['eval_rtd_loss_uniform_exit']:.4f} "
            f"compute={results['eval_compute_fraction']:.3f}"
        )
        log.info(line)
        if self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events(
                [
                    (f"Eval/{name}", float(value), step)
                    for name, value in results.items()
                    if isinstance(value, (int, float)) and value == value
                ]
            )

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
            self.bar = None
