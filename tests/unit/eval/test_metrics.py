"""Metrics against values computed by hand from the confusion matrix."""

import math

import pytest

from dsexit.eval.metrics import classification_metrics, confusion_matrix, median_metrics


def test_binary_metrics_match_hand_computed_values():
    # tp=3 (1->1), fn=1 (1->0), fp=2 (0->1), tn=4 (0->0)
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predictions = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert confusion_matrix(labels, predictions, 2) == [[4, 2], [1, 3]]
    metrics = classification_metrics(labels, predictions, 2)
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2tp / (2tp + fp + fn) = 6/9
    assert metrics["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (4 + 2) * (4 + 1)))


def test_multiclass_macro_f1_and_gorodkin_mcc():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 1, 2, 0]
    metrics = classification_metrics(labels, predictions, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class F1: 0 -> 2*1/(2+2)=0.5, 1 -> 2*2/(3+2)=0.8, 2 -> 2*1/(1+2)=2/3
    assert metrics["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c=4, s=6, p=(2,3,1), t=(2,2,2)
    expected = (4 * 6 - (2 * 2 + 3 * 2 + 1 * 2)) / math.sqrt((36 - (4 + 9 + 1)) * (36 - 12))
    assert metrics["mcc"] == pytest.approx(expected)


def test_degenerate_cases():
    constant = classification_metrics([0, 1, 1, 0], [1, 1, 1, 1], 2)
    assert constant["mcc"] == 0.0 and constant["accuracy"] == 0.5 and constant["f1"] == pytest.approx(2 / 3)
    perfect = classification_metrics([0, 1, 2], [0, 1, 2], 3)
    assert perfect == pytest.approx({"accuracy": 1.0, "f1": 1.0, "mcc": 1.0})
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1], 2)


def test_median_over_seeds_is_per_metric():
    runs = [{"test": {"accuracy": a, "f1": f}} for a, f in ((0.7, 0.1), (0.9, 0.3), (0.8, 0.2))]
    assert median_metrics(runs) == {"test": {"accuracy": 0.8, "f1": 0.2}}
    runs.append({"test": {"accuracy": 0.6, "f1": 0.0}})
    assert median_metrics(runs)["test"]["accuracy"] == pytest.approx(0.75)


def _reference(labels: list[int], predictions: list[int], num_classes: int) -> dict[str, float]:
    """The same metrics by other definitions: F1 from precision and recall, MCC as the Pearson
    correlation of the one-hot label and prediction matrices (Gorodkin's R_K), with numpy."""
    import numpy as np

    truth, guess = np.asarray(labels), np.asarray(predictions)
    f1s = []
    for cls in range(num_classes):
        true_positive = float(np.sum((guess == cls) & (truth == cls)))
        precision = true_positive / max(1, np.sum(guess == cls))
        recall = true_positive / max(1, np.sum(truth == cls))
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    x = np.eye(num_classes)[truth] - np.eye(num_classes)[truth].mean(0)
    y = np.eye(num_classes)[guess] - np.eye(num_classes)[guess].mean(0)
    denominator = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
    return {
        "accuracy": float(np.mean(truth == guess)),
        "f1": f1s[1] if num_classes == 2 else float(np.mean(f1s)),
        "mcc": float(np.sum(x * y)) / denominator if denominator else 0.0,
    }


@pytest.mark.parametrize("num_classes, seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_random_predictions_match_an_independent_computation(num_classes, seed):
    import random

    rng = random.Random(seed)
    labels = [rng.randrange(num_classes) for _ in range(300)]
    # Right about 60% of the time, so every metric is away from its degenerate value.
    predictions = [label if rng.random() < 0.6 else rng.randrange(num_classes) for label in labels]
    assert classification_metrics(labels, predictions, num_classes) == pytest.approx(
        _reference(labels, predictions, num_classes), abs=1e-12
    )
