"""Downstream evaluation of pre-trained discriminators.

What lives where:
    tasks.py      task directories (train/dev/test JSON Lines), label checks
    model_dir.py  `--model`: an HF ELECTRA export, or a dsexit checkpoint exported by the trainer's code
    finetune.py   ElectraForSequenceClassification fine-tuning (ELECTRA's recipe), median over seeds
    probe.py      frozen-feature linear probe (mode="probe"): logistic regression on final [CLS] states
    metrics.py    accuracy, F1, MCC (no sklearn)
    peak.py       this machine's matmul peak, the benchmarks' share-of-peak denominator
    paired.py     arms paired by seed: Student-t intervals, monotone curve fits, values at matched points
"""

from dsexit.eval.finetune import FinetuneConfig, finetune, finetune_many
from dsexit.eval.metrics import classification_metrics, median_metrics
from dsexit.eval.model_dir import ModelDirError, resolve_model_dir
from dsexit.eval.tasks import Task, TaskError, load_task, stratified_subset

__all__ = [
    "FinetuneConfig",
    "ModelDirError",
    "Task",
    "TaskError",
    "classification_metrics",
    "finetune",
    "finetune_many",
    "load_task",
    "median_metrics",
    "resolve_model_dir",
    "stratified_subset",
]
