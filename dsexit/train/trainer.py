"""The `Trainer`: one run, read top to bottom as its table of contents.

    build      checkpoint choice -> model + DeepSpeed engine -> data reader -> exit controller
               -> restore state -> held-out evaluator -> metrics
    train      steps until the schedule ends, the time limit passes, or a signal arrives;
               checkpoints every `save_interval`; held-out evaluation every `eval_interval`
               (and at the start and the end); a final checkpoint and a Hugging Face export
    step       the learning rate for this step (over the time budget when there is one), then
               grad_accum micro-batches through the mode's step runner (`step_runner.py`) with
               the controller's tau or capacity level, then
               one all-reduce of the step's statistics (and stop votes), then the controller update

Everything a checkpoint must carry to resume exactly (data position, exit controller,
every rank's RNG state, the counters) is registered once with the checkpoint manager,
which saves and restores it; the resolved config goes into each checkpoint's marker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from dsexit.data import StreamingShardReader, read_validation_samples
from dsexit.model import exit_controller_for, kernels
from dsexit.train.checkpoint.files import CheckpointRef
from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.checkpoint.rundir import RunPlan, claim
from dsexit.train.checkpoint.universal import load_dir_of
from dsexit.train.cluster.membership import WorldChange
from dsexit.train.cluster.preemption import PreemptionHandler
from dsexit.train.compiling import CompiledForward, compile_decision
from dsexit.train.config.resolve import CONFIG_FILE, ResolvedRun
from dsexit.train.engine import build_engine, build_model
from dsexit.train.export import export_hf
from dsexit.train.heldout import HeldOutEvaluator, Standing
from dsexit.train.metrics import MetricsLogger
from dsexit.train.rng import RngStates, rank_seed, seed_everything, use_deterministic_kernels
from dsexit.train.step_runner import data_parallel_rank, make_step_runner
from dsexit.train.step_stats import StepStats, StepSummary

log = logging.getLogger("dsexit")

BASELINE_SHARDS = 8  # the held-out unigram baseline's estimate: enough tokens, no full pass over a large dataset


class _Progress:
    """The trainer's counters as a `Stateful` (registered with the checkpoint manager)."""

    FIELDS = ("step", "samples_seen", "tokens_seen", "budget_minutes")

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self.trainer, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.FIELDS:
            setattr(self.trainer, name, type(getattr(self.trainer, name))(state[name]))


class Trainer:
    """One run of a `ResolvedRun` that `begin_run` has begun (its run id agreed on every rank).

    Raises the errors of `dsexit.train.errors`: CheckpointError when the checkpoint to resume
    cannot be used (every rank raises the same one), CheckpointSpaceError when the disk fills while
    saving; a lost peer surfaces as torch's DistBackendError. What ends the process, and with which
    exit code, is the caller's (dsexit/commands/pretrain.py).
    """

    def __init__(self, run: ResolvedRun, world_change: WorldChange | None = None):
        if run.run_id is None:
            raise ValueError("the run has no id yet: pass it through begin_run (dsexit.train.config.resolve) first.")
        # --- core configs
        self.run = run
        self.config = run.config
        self.world = run.world
        if self.config.job.deterministic:
            use_deterministic_kernels()
        # --- runtime utilities
        self.preemption = PreemptionHandler().install()
        self.run_plan = run.run_plan or RunPlan("new", None)
        self.checkpoints = CheckpointManager(
            run.checkpoint_location,
            os.path.join(run.run_dir, "checkpoints"),
            self.config.checkpoint.keep_last,
            self.world,
            run_id=run.run_id,
            policy=run.retry_policy(),
        )
        self.started_at = time.monotonic()
        # --- progress counters (restored from a checkpoint)
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.budget_minutes = 0.0  # training wall clock spent, over every resume (rank 0's clock)
        self.minutes_at_start = 0.0
        self.eval_seconds = 0.0  # held-out evaluation is measurement: it does not count against the budget
        # --- swappable components
        resume_from = self.checkpoints.find_resume(self.config.checkpoint.resume)  # the one resolution read, verified
        # The same run, unless the nodes settled on a checkpoint of another data-parallel size than the one
        # resolution read (a newer one that only rank 0's disk holds gave way to the mirror's).
        self.run = run = run.resuming(resume_from)
        self.latest_checkpoint: CheckpointRef | None = None
        load_dir = (
            load_dir_of(resume_from, run.dp_size, run.zero_stage, self.world, self.checkpoints.whole)
            if resume_from
            else None
        )
        self.pipeline_stages = self.config.parallelism.pipeline_stages
        self.engine = build_engine(
            self._build_model(), run.ds_config, self.pipeline_stages, self.config.parallelism.pipeline_partition
        )
        self.device = torch.device(self.engine.device)
        self.compiled = self._compile_or_not()
        dp_rank = data_parallel_rank(self.engine, self.pipeline_stages, self.world.rank)
        self.data = StreamingShardReader(
            run.data_url,
            global_batch_size=self.config.training.global_batch_size,
            micro_batch_size=self.config.training.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=run.dp_size,
            seed=self.config.job.seed,
            shuffle_window=self.config.data.shuffle_window,
            prefetch=self.config.data.prefetch,
            index=run.dataset,
            cache_dir=self.config.data.cache_dir or os.path.join(run.run_dir, "shard-cache"),
        )
        self.steps = make_step_runner(
            self.engine,
            self.data,
            run.grad_accum,
            self.device,
            self._set_learning_rate,
            run.model_config,
            self.pipeline_stages,
            before_forward=self.compiled.before_forward if self.compiled is not None else None,
            min_confidence=self.config.exit_control.min_confidence,
        )
        self.exit_controller = exit_controller_for(run.model_config, **dataclasses.asdict(self.config.exit_control))
        seed_everything(rank_seed(self.config.job.seed, self.world.rank))
        self.rng = RngStates(self.config.job.seed, self.world.rank, self.world.world_size, lambda: self.step)
        for name, stateful in (
            ("progress", _Progress(self)),
            ("data", self.data),
            ("exit_controller", self.exit_controller),
            ("rng", self.rng),
        ):
            self.checkpoints.register(name, stateful)
        if resume_from is not None:
            self.restore(resume_from, load_dir)
            if self.run_plan.mode == "rollback":
                self.checkpoints.point_latest(resume_from)
                log.info("rolled back to %s: --resume auto continues from here", resume_from.tag)
        # what changed since this node's last worker stopped (`membership.begin`), said once resumed
        self.world_change = world_change if self.world.is_main else None
        if self.world_change is not None:
            log.warning("the job changed: %s", self.world_change.sentence(self.step))
        self.heldout = self._build_heldout()
        self.last_eval: dict[str, float] | None = None
        self.standing: Standing | None = None  # the final held-out verdict, for the run's last line
        self.metrics = MetricsLogger(
            run.run_dir,
            self.world,
            total_steps=run.total_steps,
            start_step=self.step,
            log_interval=self.config.metrics.log_interval,
            progress=self.config.metrics.progress,
            monitor=self.engine.monitor,
        )

    def _compile_or_not(self) -> CompiledForward | None:
        """`--compile`: the model compiled in place, or eager with the kernels the process's set-up chose
        (on a CPU, `dsexit.cpu`'s, which do not compile). Said in one log line."""
        training = self.config.training
        compiling, why = compile_decision(training.compile, self.device, self.run.zero_stage, self.pipeline_stages)
        if not compiling:
            log.info("eager forward (%s)%s", why, "" if kernels.uses_defaults() else "; CPU kernels")
            return None
        capacity_routing = self.run.model_config.exit_routing != "threshold"
        compiled = CompiledForward(self.engine, self.device, training.compile_backend, capacity_routing)
        log.info(
            "compiling the training forward (%s, backend %s, fullgraph, static shapes%s%s); the first step's time "
            "includes it",
            why,
            training.compile_backend,
            ", CUDA graphs" if compiled.cuda_graphs else "",
            ", one graph per capacity level the run visits" if capacity_routing else "",
        )
        return compiled

    @property
    def _cache_dir(self) -> str:
        return self.config.data.cache_dir or os.path.join(self.run.run_dir, "shard-cache")

    def _token_counts(self, max_shards: int | None = None):
        """Corpus token counts: all shards for the unigram generator; the held-out unigram baseline
        needs only an estimate, from the first `max_shards` (reused when all were counted)."""
        from dsexit.data.stats import token_counts

        if getattr(self, "_counts", None) is None:
            return token_counts(self.run.dataset, cache_dir=self._cache_dir, max_shards=max_shards)
        return self._counts

    def _build_model(self):
        model = build_model(self.run.model_config, self.config.job.seed)
        if self.run.model_config.generator == "unigram":
            self._counts = self._token_counts()
            model.set_unigram_counts(torch.from_numpy(self._counts))
        return model

    def _build_heldout(self) -> HeldOutEvaluator | None:
        metrics = self.config.metrics
        if metrics.eval_interval == 0:
            return None
        if not self.run.dataset.validation_shards:
            log.warning(
                "the dataset %s has no validation split: held-out evaluation is off "
                "(prepare_data --validation-fraction makes one)",
                self.run.dataset.url,
            )
            return None
        samples = read_validation_samples(self.run.dataset, metrics.eval_samples, cache_dir=self._cache_dir)
        return HeldOutEvaluator(
            samples,
            self.run.model_config,
            unigram_counts=self._token_counts(BASELINE_SHARDS),
            seed=self.config.job.seed,
            batch_size=metrics.eval_batch_size,
            rank=self.world.rank,
            world_size=self.world.world_size,
        )

    def evaluate(self) -> dict[str, float] | None:
        """Held-out metrics of the model now (every rank takes part); rank 0 records them."""
        if self.heldout is None:
            return None
        started = time.monotonic()
        results = self.heldout.evaluate(
            self._evaluation_model(),
            self.exit_controller.threshold(self.step),
            self.device,
            exit_capacity=self.exit_controller.capacity(self.step),
        )
        results["eval_seconds"] = time.monotonic() - started
        results["train_minutes"] = self._minutes_spent() if self.step else 0.0
        self.eval_seconds += results["eval_seconds"]
        self.metrics.record_eval(
            self.step,
            results,
            exit_threshold=self.exit_controller.threshold(self.step),
            exit_capacity=self.exit_controller.capacity(self.step),
        )
        self.last_eval = results
        return results

    def _evaluation_model(self):
        """The model the evaluator may call sub-module by sub-module. Under ZeRO-3 every parameter is
        partitioned and fetched by hooks around each module's forward, which the evaluator's direct
        calls (the generator reading the tied embedding matrix of another module) do not follow; a
        pipeline stage holds only some layers. Either gets a whole copy on every rank, gathered once
        per evaluation, so every rank evaluates its slice of the samples as in a data-parallel run."""
        module = self.engine.module
        if self.pipeline_stages > 1:
            from dsexit.parallel.pipeline import gather_model_state_dict

            state = gather_model_state_dict(module, contributes=self.engine.grid.get_data_parallel_rank() == 0)
        elif self.run.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        else:
            return module
        # Building initialises weights (and torch.manual_seed seeds every device): leave the training RNG alone.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            copy = build_model(self.run.model_config, self.config.job.seed)
        copy.load_state_dict(state)
        dtype = next(module.parameters()).dtype
        return copy.to(device=self.device, dtype=dtype)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "dp_size": self.run.dp_size,
            "world_size": self.world.world_size,
            "zero_stage": self.run.zero_stage,
            "pipeline_stages": self.pipeline_stages,
            "precision": self.run.precision,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "data_url": self.config.data.url,
            "config": self.run.to_dict(),
            "saved_at": time.time(),
        }

    def save_checkpoint(self) -> CheckpointRef:
        """Save on every rank; CheckpointSpaceError when the disk fills (the torn step is removed)."""
        started = time.monotonic()
        ref = self.checkpoints.save(self.engine, self.step, self.checkpoint_meta())
        self.latest_checkpoint = ref
        log.info("saved checkpoint %s in %.1fs", ref.path, time.monotonic() - started)
        return ref

    def restore(self, ref: CheckpointRef, load_dir: str) -> None:
        self.checkpoints.load(self.engine, ref, load_dir)  # every registered component gets its state back
        self.minutes_at_start = self.budget_minutes
        self.latest_checkpoint = ref
        log.info(
            "resumed from %s at step %d (%d samples seen; saved at world size %d, now %d)",
            ref.path,
            self.step,
            self.samples_seen,
            self.rng.saved_world_size,
            self.world.world_size,
        )

    # ------------------------------------------------------------------ the run
    def train(self) -> str:
        """Train to the end of the schedule (or a stop request); returns why it stopped."""
        if self.world.is_main:
            claim(self.run.run_dir, self.run_plan, self.checkpoints.run_id)
            with open(os.path.join(self.run.run_dir, CONFIG_FILE), "w") as handle:
                handle.write(self.run.to_json())
        reason = "finished" if self.step >= self.run.total_steps else None
        self.started_at, self.eval_seconds = time.monotonic(), 0.0
        if reason is None and self.step == 0:
            self.evaluate()  # the untrained model: every curve's first point
        eval_interval = self.config.metrics.eval_interval
        while reason is None:
            summary = self.train_step()
            if eval_interval and self.step % eval_interval == 0:
                self.evaluate()
            if self.step % self.config.checkpoint.interval == 0:
                self.save_checkpoint()
            reason = self.stop_reason(summary)
        if reason != "preempted" and eval_interval:
            final = self.evaluate() if self.step % eval_interval else self.last_eval
            if final is not None:
                self.standing = Standing.of(final, self.run.model_config.generator)
        self.metrics.close()
        log.info("stopping at step %d: %s", self.step, reason)
        if self.latest_checkpoint is None or self.latest_checkpoint.step != self.step:
            self.save_checkpoint()
        if reason != "preempted" and self.config.checkpoint.export_hf and self.world.is_main:
            export_hf(self.checkpoints.whole(self.latest_checkpoint), os.path.join(self.run.run_dir, "hf"))
        dist.barrier()
        self.data.close()
        self.preemption.uninstall()
        return reason

    def stop_reason(self, summary: StepSummary) -> str | None:
        if summary.stop_preempted:
            return "preempted"
        if self.step >= self.run.total_steps:
            return "finished"
        if summary.stop_time_limit:
            return "time limit"
        return None

    def _minutes_spent(self) -> float:
        """Training wall clock over every resume, by this rank's clock (rank 0's is the one used)."""
        return self.minutes_at_start + (time.monotonic() - self.started_at - self.eval_seconds) / 60

    def _time_limit_reached(self) -> bool:
        limit = self.config.training.max_minutes
        return limit is not None and self.world.is_main and self._minutes_spent() >= limit

    def _set_learning_rate(self) -> float:
        """With a time budget, the schedule runs over it (`budget_lr_factor`); else DeepSpeed's own."""
        optimizer = self.engine.optimizer
        if self.config.training.max_minutes is None:
            return optimizer.param_groups[0]["lr"]
        lr = self.config.optim.lr * self.config.budget_lr_factor(self.step, self.run.total_steps, self.budget_minutes)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> StepSummary:
        step_started = time.perf_counter()
        exit_threshold = self.exit_controller.threshold(self.step)
        exit_capacity = self.exit_controller.capacity(self.step)
        tau_at_floor = exit_threshold is not None and self.exit_controller.at_floor
        capacity_at_floor = exit_capacity is not None and self.exit_controller.at_floor
        stats = StepStats(self.run.model_config.num_hidden_layers)
        mix = self.run.model_config.replacement_mix_at(self.step)
        ran = self.steps.run(exit_threshold, mix, stats, exit_capacity=exit_capacity)
        summary = stats.reduce(
            preempted=self.preemption.requested,
            time_limit=self._time_limit_reached(),
            minutes=self._minutes_spent() if self.world.is_main else 0.0,
            device=self.device,
        )
        self.budget_minutes = summary.minutes  # rank 0's clock, the same on every rank
        summary.stage_counters = ran.stage_counters
        self.exit_controller.update(summary.compute_fraction, self.step, floor_counts=summary.floor_counts)
        self.step += 1
        self.samples_seen += self.config.training.global_batch_size
        self.tokens_seen += summary.real_tokens
        self.metrics.record(
            self.step,
            summary,
            exit_threshold=exit_threshold,
            tau_at_floor=tau_at_floor,
            exit_capacity=exit_capacity,
            capacity_at_floor=capacity_at_floor,
            lr=ran.lr,
            seconds=time.perf_counter() - step_started,
            data_wait_seconds=ran.data_wait_seconds,
            samples_seen=self.samples_seen,
            tokens_seen=self.tokens_seen,
        )
        if self.world_change is not None:
            since = self.world_change.seconds_since_stop()
            if since is not None:
                log.info("first step, %.1f s after the previous worker on this node stopped", since)
            self.world_change = None
        if self.compiled is not None and not self.compiled.first_step_logged:
            self.compiled.first_step_logged = True
            log.info("first step, compilation included: %.1f s", time.perf_counter() - step_started)
        if summary.stop_preempted and self.world.is_main:
            log.warning(
                "preemption requested (%s): saving a checkpoint at step %d, then exiting",
                self.preemption.signal_name or "signal on another rank",
                self.step,
            )
        return summary
