"""Classification metrics for downstream evaluation, without sklearn.

`classification_metrics` gives accuracy, F1 and Matthews correlation (MCC) from label
lists. F1 is the positive class's (label 1) for binary tasks, as GLUE reports it for
MRPC/QQP, and the unweighted mean over classes (macro F1) otherwise. MCC is Gorodkin's
multiclass generalisation, which equals the usual binary formula for two classes; it is
0.0 where it is undefined (a constant prediction or a single true class).
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> list[list[int]]:
    """counts[true][predicted]; labels and predictions are class indices in [0, num_classes)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions; expected as many of each.")
    counts = [[0] * num_classes for _ in range(num_classes)]
    for true, predicted in zip(labels, predictions):
        counts[true][predicted] += 1
    return counts


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if not labels:
        return 0.0
    return sum(int(a == b) for a, b in zip(labels, predictions)) / len(labels)


def f1_per_class(counts: list[list[int]]) -> list[float]:
    scores = []
    for cls in range(len(counts)):
        true_positive = counts[cls][cls]
        predicted = sum(row[cls] for row in counts)
        actual = sum(counts[cls])
        denominator = predicted + actual
        scores.append(2.0 * true_positive / denominator if denominator else 0.0)
    return scores


def matthews_corrcoef(counts: list[list[int]]) -> float:
    """Gorodkin (2004) R_K; for two classes (tp*tn - fp*fn) / sqrt(...)."""
    total = sum(map(sum, counts))
    correct = sum(counts[k][k] for k in range(len(counts)))
    predicted = [sum(row[k] for row in counts) for k in range(len(counts))]
    actual = [sum(row) for row in counts]
    numerator = correct * total - sum(p * t for p, t in zip(predicted, actual))
    denominator = math.sqrt(total * total - sum(p * p for p in predicted)) * math.sqrt(
        total * total - sum(t * t for t in actual)
    )
    return numerator / denominator if denominator else 0.0


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> dict[str, float]:
    """{"accuracy", "f1", "mcc"} for class-index labels and predictions."""
    counts = confusion_matrix(labels, predictions, num_classes)
    f1_scores = f1_per_class(counts)
    f1 = f1_scores[1] if num_classes == 2 else sum(f1_scores) / num_classes
    return {"accuracy": accuracy(labels, predictions), "f1": f1, "mcc": matthews_corrcoef(counts)}


def median_metrics(per_seed: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median over seeds of every {split: {metric: value}} entry (the ELECTRA/GLUE protocol)."""
    if not per_seed:
        return {}
    return {
        split: {name: statistics.median(run[split][name] for run in per_seed) for name in per_seed[0][split]}
        for split in per_seed[0]
    }
