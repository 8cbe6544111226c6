"""Fine-tune `transformers.ElectraForSequenceClassification` on a task, or probe it; median over seeds.

The fine-tuning protocol follows ELECTRA's GLUE evaluation (Clark et al. 2020) and its
published hyper-parameters for ELECTRA-Small (google-research/electra,
`configure_finetuning.py`): full depth (no early exit; exit heads are not part of the
export), AdamW at lr 3e-4 with linear warmup (10%) and linear decay, layer-wise learning-rate
decay 0.8, weight decay 0.01 except biases and LayerNorm, dropout as in the model config,
3 epochs (10 for RTE and STS), several seeds, and the median over seeds of each metric.
Dev selects nothing by default (`select="final"`: the metrics after the last epoch);
`select="best-dev"` reports each seed's epoch with the best dev accuracy (its test
metrics then come from that epoch). `mode="probe"` instead fits a linear classifier on
frozen features (`dsexit.eval.probe`), which measures the representation without
fine-tuning noise. `max_train_examples` draws a seeded, label-stratified subsample.

    result = finetune(model_dir, load_task(task_dir), FinetuneConfig(seeds=3))
    result["median"]["test"]["accuracy"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import random
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from dsexit.eval.metrics import classification_metrics, median_metrics
from dsexit.eval.probe import extract_features, probe_seed
from dsexit.eval.tasks import SPLITS, Example, Task, stratified_subset
from dsexit.train.config import PRECISIONS

log = logging.getLogger("dsexit.eval")

MODES = ("finetune", "probe")
SELECT_MODES = ("final", "best-dev")
TASK_EPOCHS = {"rte": 10, "sts": 10, "sts-b": 10, "stsb": 10}
"""ELECTRA's epochs for its small GLUE tasks, by lower-cased task name; every other task gets DEFAULT_EPOCHS."""
DEFAULT_EPOCHS = 3
ENCODER_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


def task_epochs(task_name: str) -> int:
    return TASK_EPOCHS.get(task_name.lower(), DEFAULT_EPOCHS)


@dataclass
class FinetuneConfig:
    mode: str = "finetune"
    """'finetune' (the whole model) or 'probe' (a linear classifier on frozen features)."""
    lr: float = 3e-4
    """Peak learning rate: ELECTRA's for Small (Base used 1e-4, Large 5e-5)."""
    layerwise_lr_decay: float = 0.8
    """ELECTRA's layer-wise decay (Small and Base; Large 0.9): the head gets lr, encoder layer i (of N)
    lr * decay^(N + 1 - i), the embeddings lr * decay^(N + 2); 1.0 disables."""
    epochs: int | None = None
    """Passes over the train split; None: the task's (ELECTRA's: 10 for RTE and STS, else 3)."""
    batch_size: int = 32
    eval_batch_size: int = 128
    max_seq_len: int = 128
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seeds: int = 3
    first_seed: int = 1
    select: str = "final"
    """'final' (dev picks nothing) or 'best-dev' (each seed's best-dev epoch)."""
    precision: str = "auto"
    """bf16 autocast where the hardware runs bf16 natively (AMX/AVX512-BF16 CPU, CUDA), else fp32."""
    max_train_examples: int | None = None
    """Train on N train examples only, a label-stratified subsample drawn with `subsample_seed` (quick runs)."""
    max_eval_examples: int | None = None
    """Evaluate on N dev/test examples only, drawn as the train ones (tests and quick smoke runs)."""
    subsample_seed: int = 0
    """Draws the subsamples; apart from the run seeds, so that every seed sees the same examples."""
    probe_l2: float = 1e-3
    """Probe only: the L2 penalty on the linear classifier's weights (added to the mean cross-entropy)."""
    probe_max_iterations: int = 500
    """Probe only: the L-BFGS iterations at most (it stops earlier once converged)."""
    progress: str = "auto"
    """'bar' on a terminal, 'lines' (one line per epoch) otherwise, 'none' for silence."""

    def examples(self, task: Task, split: str) -> list[Example]:
        """The examples of a split that are used: all, or the stratified subsample the limit asks for."""
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        return stratified_subset(task.splits[split], limit, self.subsample_seed)

    def epochs_for(self, task: Task) -> int:
        return self.epochs if self.epochs is not None else task_epochs(task.name)

    def validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected {expected}.")

        if self.mode not in MODES:
            fail("mode", f"one of {', '.join(MODES)}")
        for name in ("batch_size", "eval_batch_size", "max_seq_len", "seeds", "probe_max_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            fail("epochs", "a positive integer, or None for the task's default")
        if not (math.isfinite(self.lr) and self.lr > 0):
            fail("lr", "a positive learning rate")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            fail("layerwise_lr_decay", "a factor in (0, 1], 1.0 for no decay")
        if not (math.isfinite(self.probe_l2) and self.probe_l2 >= 0):
            fail("probe_l2", "a non-negative penalty")
        if not isinstance(self.subsample_seed, int):
            fail("subsample_seed", "an integer")
        if not 0.0 <= self.warmup_fraction < 1.0:
            fail("warmup_fraction", "a fraction in [0, 1)")
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "a positive number of examples")
        if self.select not in SELECT_MODES:
            fail("select", f"one of {', '.join(SELECT_MODES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {', '.join(PRECISIONS)}")
        if self.precision == "bf16" and not _bf16_native():
            fail("precision", "'auto' or 'fp32' (this hardware has no native bf16)")


def _bf16_native() -> bool:
    from dsexit.train.config.ds_config import bf16_supported

    return bf16_supported()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EncodedSplit:
    """Token ids of one split, unpadded; batches are padded to their longest member."""

    def __init__(self, tokenizer, task: Task, examples: list[Example], max_seq_len: int):
        texts_a = [example.text_a for example in examples]
        texts_b = [example.text_b for example in examples] if any(e.text_b is not None for e in examples) else None
        encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=max_seq_len, return_token_type_ids=True)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.token_type_ids: list[list[int]] = encoded["token_type_ids"]
        self.labels = [task.class_index(example.label) for example in examples]
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(indices), width), dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            length = len(self.input_ids[i])
            input_ids[row, :length] = torch.tensor(self.input_ids[i])
            token_type_ids[row, :length] = torch.tensor(self.token_type_ids[i])
            attention_mask[row, :length] = 1
        return {
            "input_ids": input_ids.to(device),
            "token_type_ids": token_type_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "labels": torch.tensor([self.labels[i] for i in indices], device=device),
        }


def encode_task(model_dir: str, task: Task, config: FinetuneConfig) -> dict[str, EncodedSplit]:
    from transformers import AutoConfig, AutoTokenizer

    max_positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    if config.max_seq_len > max_positions:
        raise ValueError(
            f"max_seq_len={config.max_seq_len} is invalid; expected at most the model's "
            f"max_position_embeddings={max_positions}."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {split: EncodedSplit(tokenizer, task, config.examples(task, split), config.max_seq_len) for split in SPLITS}


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def evaluate(model, split: EncodedSplit, num_labels: int, batch_size: int, use_bf16: bool) -> dict[str, float]:
    device = next(model.parameters()).device
    model.eval()
    predictions: list[int] = []
    with torch.no_grad(), _autocast(device, use_bf16):
        for start in range(0, len(split), batch_size):
            batch = split.batch(list(range(start, min(start + batch_size, len(split)))), device)
            batch.pop("labels")
            predictions += model(**batch).logits.float().argmax(-1).tolist()
    return classification_metrics(split.labels, predictions, num_labels)


def _depth(parameter_name: str, num_layers: int) -> int:
    """ELECTRA's depths: embeddings (and their projection) 0, encoder layer i at i + 1, the task head num_layers + 2."""
    if parameter_name.startswith("electra.embeddings"):
        return 0
    layer = ENCODER_LAYER.search(parameter_name)
    return int(layer.group(1)) + 1 if layer else num_layers + 2


def parameter_groups(model, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups of an `ElectraForSequenceClassification`, one per (depth, weight decay or not).

    No weight decay on biases and LayerNorm (`dsexit.train.param_groups`, shared with pre-training).
    The learning rate is lr * decay^(num_layers + 2 - depth), ELECTRA's rule (its depth
    num_layers + 1 is unused, so the top layer already gets decay^2).
    """
    from dsexit.train.param_groups import parameter_groups as weight_decay_groups

    num_layers = model.config.num_hidden_layers

    def lr_for(name: str) -> float:
        return config.lr * config.layerwise_lr_decay ** (num_layers + 2 - _depth(name, num_layers))

    return weight_decay_groups(model.named_parameters(), config.weight_decay, lr_for)


def _optimizer(model, config: FinetuneConfig, total_steps: int):
    """AdamW; the learning rate rises linearly from 0 over the warmup steps, then falls linearly to 0
    (Hugging Face's schedule; ELECTRA's warms up from 0 the same way)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, eps=1e-6)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def finetune_seed(
    model_dir: str, task: Task, data: dict[str, EncodedSplit], config: FinetuneConfig, seed: int
) -> dict[str, Any]:
    """One fine-tuning run; returns per-epoch history and the selected epoch's metrics."""
    from transformers import ElectraForSequenceClassification

    random.seed(seed)
    torch.manual_seed(seed)
    device = _device()
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and _bf16_native())
    model = ElectraForSequenceClassification.from_pretrained(model_dir, num_labels=task.num_labels).to(device)
    train, epochs = data["train"], config.epochs_for(task)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    optimizer, schedule = _optimizer(model, config, steps_per_epoch * epochs)
    order_rng = torch.Generator().manual_seed(seed)
    bar = _progress_bar(config, steps_per_epoch * epochs, f"seed {seed}")
    history, started = [], time.perf_counter()
    with _logs_above(bar):  # the epoch lines print above a live bar
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=order_rng).tolist()
            loss_sum = 0.0
            for start in range(0, len(order), config.batch_size):
                batch = train.batch(order[start : start + config.batch_size], device)
                with _autocast(device, use_bf16):
                    loss = model(**batch).loss
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach())
                if bar is not None:
                    bar.update(1)
            record = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch}
            for split in ("dev", "test"):
                record[split] = evaluate(model, data[split], task.num_labels, config.eval_batch_size, use_bf16)
            history.append(record)
            if config.progress != "none":
                log.info(
                    "seed=%d epoch=%d/%d train_loss=%.4f dev_acc=%.4f test_acc=%.4f",
                    seed,
                    epoch,
                    epochs,
                    record["train_loss"],
                    record["dev"]["accuracy"],
                    record["test"]["accuracy"],
                )
    if bar is not None:
        bar.close()
    chosen = history[-1] if config.select == "final" else max(history, key=lambda r: r["dev"]["accuracy"])
    return {
        "seed": seed,
        "selected_epoch": chosen["epoch"],
        "dev": chosen["dev"],
        "test": chosen["test"],
        "epochs": history,
        "seconds": time.perf_counter() - started,
        "bf16": use_bf16,
    }


@contextlib.contextmanager
def _logs_above(bar):
    """While a bar is live, log lines go through tqdm (tqdm.contrib.logging) so the bar is not torn."""
    if bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm([logging.root, logging.getLogger("dsexit")]):
        yield


def _progress_bar(config: FinetuneConfig, total: int, description: str):
    if config.progress == "bar" or (config.progress == "auto" and sys.stderr.isatty()):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, leave=False)
    return None


def finetune(model_dir: str, task: Task, config: FinetuneConfig, workers: int = 1) -> dict[str, Any]:
    """Fine-tune (or probe) with `config.seeds` seeds; per-seed results and their median."""
    return finetune_many([model_dir], task, config, workers)[0]


def finetune_many(
    model_dirs: list[str],
    task: Task,
    config: FinetuneConfig,
    workers: int = 1,
    on_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune (or probe) every model with every seed; one result per model, as `finetune` returns it.

    Fine-tuning makes each (model, seed) pair one job; a probe makes each model one job,
    since its seeds share the model's features and cost next to nothing. With `workers` > 1
    the jobs run in that many spawned processes that share the machine's threads, so that
    a CPU with fewer cores than jobs stays busy (a seed alone rarely uses several cores
    well at these sizes). `on_done(model_dir, seed_result)` is called as each seed finishes.
    """
    config.validate()
    if workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; expected a positive number of processes.")
    seeds = range(config.first_seed, config.first_seed + config.seeds)
    runs: dict[tuple[str, int], dict[str, Any]] = {}

    def record(model_dir: str, run: dict[str, Any]) -> None:
        runs[model_dir, run["seed"]] = run
        if on_done:
            on_done(model_dir, run)

    if workers == 1:
        _quiet_transformers()
        for model_dir in model_dirs:
            run_model_seeds(model_dir, task, config, seeds, on_seed=functools.partial(record, model_dir))
    else:
        jobs = (
            [(model_dir, seeds) for model_dir in model_dirs]
            if config.mode == "probe"
            else [(model_dir, [seed]) for model_dir in model_dirs for seed in seeds]
        )
        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {
                pool.submit(_worker_job, model_dir, task, config, job_seeds, threads): model_dir
                for model_dir, job_seeds in jobs
            }
            for future in as_completed(pending):
                for run in future.result():
                    record(pending[future], run)
    return [_summary(model_dir, task, config, [runs[model_dir, seed] for seed in seeds]) for model_dir in model_dirs]


def run_model_seeds(
    model_dir: str, task: Task, config: FinetuneConfig, seeds, on_seed: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """The runs of one model, one per seed; the task is tokenized (and probe features extracted) once."""
    data = encode_task(model_dir, task, config)
    if config.mode == "probe":
        features = extract_features(model_dir, data, config.eval_batch_size, _device())
        run_seed = functools.partial(probe_seed, features, task.num_labels, config)
    else:
        run_seed = functools.partial(finetune_seed, model_dir, task, data, config)
    runs = []
    for seed in seeds:
        runs.append(run_seed(seed=seed))
        if on_seed:
            on_seed(runs[-1])
    return runs


def _worker_job(model_dir: str, task: Task, config: FinetuneConfig, seeds, threads: int) -> list[dict[str, Any]]:
    """One job in a worker process: some seeds of one model."""
    torch.set_num_threads(threads)
    _quiet_transformers()
    return run_model_seeds(model_dir, task, config, seeds)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()


def _protocol(task: Task, config: FinetuneConfig) -> str:
    if config.mode == "probe":
        method = (
            f"linear probe on frozen final-layer [CLS] features (logistic regression, L-BFGS, L2 {config.probe_l2:g})"
        )
    else:
        method = (
            f"fine-tuning (lr {config.lr:g}, layer-wise decay {config.layerwise_lr_decay:g}, "
            f"{config.epochs_for(task)} epochs)"
        )
        method += "; per seed the " + (
            "metrics after the last epoch (dev selects nothing)"
            if config.select == "final"
            else "epoch with the best dev accuracy"
        )
    return f"mode {config.mode}: {method}; median over {config.seeds} seeds of each metric"


def _summary(model_dir: str, task: Task, config: FinetuneConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = median_metrics([{split: run[split] for split in ("dev", "test")} for run in runs])
    return {
        "model_dir": model_dir,
        "task": task.directory,
        "num_labels": task.num_labels,
        "labels": task.labels,
        "examples": {split: len(config.examples(task, split)) for split in SPLITS},
        "config": {**dataclasses.asdict(config), "epochs": config.epochs_for(task)},
        "protocol": _protocol(task, config),
        "per_seed": runs,
        "median": median,
    }
