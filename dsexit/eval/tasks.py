"""Downstream task directories: DIR/{train,dev,test}.jsonl, read and checked before any work.

One JSON object a line: `text` (single sentence) or `text_a` + `text_b` (sentence pair),
and an integer `label`. The label set is the train split's; class indices are the sorted
train labels, so labels need not be 0..K-1. Every user error raises `TaskError` with one
sentence naming the file, the line and what was expected.

`stratified_subset` draws a seeded, label-stratified subsample of a split, so that a
file sorted by label still yields every class in its proportion.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

SPLITS = ("train", "dev", "test")
SPLIT_SUFFIXES = (".jsonl", ".json")


class TaskError(ValueError):
    """A task directory the user gave cannot be used; raised before any training."""


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: int  # the raw label from the file


@dataclass
class Task:
    name: str
    directory: str
    splits: dict[str, list[Example]]
    labels: list[int]
    """Sorted distinct train labels; class index = position in this list."""

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def class_index(self, label: int) -> int:
        return self.labels.index(label)


def stratified_subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """`limit` examples drawn per label in proportion to the label's count, chosen by `seed`; file order kept.

    Shares are rounded by largest remainder, so the subset holds exactly `limit` examples
    (all of them where `limit` is None or not smaller than the split).
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    positions_by_label: dict[int, list[int]] = {}
    for position, example in enumerate(examples):
        positions_by_label.setdefault(example.label, []).append(position)
    labels = sorted(positions_by_label)
    exact_shares = {label: limit * len(positions_by_label[label]) / len(examples) for label in labels}
    shares = {label: int(exact_shares[label]) for label in labels}
    by_remainder = sorted(labels, key=lambda label: shares[label] - exact_shares[label])
    for label in by_remainder[: limit - sum(shares.values())]:
        shares[label] += 1
    rng = random.Random(seed)
    chosen = [position for label in labels for position in rng.sample(positions_by_label[label], shares[label])]
    return [examples[position] for position in sorted(chosen)]


def split_path(directory: str, split: str) -> str | None:
    for suffix in SPLIT_SUFFIXES:
        path = os.path.join(directory, split + suffix)
        if os.path.isfile(path):
            return path
    return None


def _read_split(path: str) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{where} is not valid JSON ({error.msg}); expected one JSON object a line.") from None
            if not isinstance(record, dict):
                raise TaskError(f"{where} holds {type(record).__name__}; expected a JSON object.")
            if "text" in record:
                text_a, text_b = record["text"], None
            elif "text_a" in record:
                text_a, text_b = record["text_a"], record.get("text_b")
            else:
                raise TaskError(f"{where} has no 'text' or 'text_a' field; expected one of them.")
            if not isinstance(text_a, str) or not (text_b is None or isinstance(text_b, str)):
                raise TaskError(f"{where} has a non-string text field; expected strings.")
            if "label" not in record:
                raise TaskError(f"{where} has no 'label' field; expected an integer label.")
            label = record["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise TaskError(f"{where} has label={label!r}; expected an integer class label.")
            examples.append(Example(text_a, text_b, label))
    if not examples:
        raise TaskError(f"{path} holds no examples; expected at least one JSON line.")
    return examples


def load_task(directory: str) -> Task:
    """Read and check all three splits; raises TaskError on the first problem."""
    if not os.path.isdir(directory):
        raise TaskError(
            f"task directory {directory!r} does not exist; expected a directory holding train/dev/test .jsonl files."
        )
    paths = {split: split_path(directory, split) for split in SPLITS}
    missing = [split for split, path in paths.items() if path is None]
    if missing:
        raise TaskError(
            f"task directory {directory!r} has no {missing[0]} split; expected "
            f"{', '.join(split + '.jsonl' for split in SPLITS)}."
        )
    splits = {split: _read_split(path) for split, path in paths.items()}
    labels = sorted({example.label for example in splits["train"]})
    if len(labels) < 2:
        raise TaskError(f"{paths['train']} has only label {labels[0]}; expected at least two classes.")
    for split in ("dev", "test"):
        for number, example in enumerate(splits[split], 1):
            if example.label not in labels:
                raise TaskError(
                    f"{paths[split]} example {number} has label {example.label}, which the train split "
                    f"does not have; expected one of {labels}."
                )
    return Task(os.path.basename(os.path.normpath(directory)), directory, splits, labels)
