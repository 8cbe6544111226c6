"""Fixtures for the evaluation tests (unit and integration): tiny random ELECTRA exports and synthetic
task directories. Each tier's conftest imports the fixtures it uses.

The tokenizer comes from the project's embedded default dataset (ELECTRA's WordPiece
vocabulary), so these fixtures need nothing outside the repository.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

POSITIVE = ("good", "great", "excellent", "wonderful", "fine", "happy")
NEGATIVE = ("bad", "awful", "terrible", "horrible", "poor", "sad")
FILLER = (
    "the",
    "movie",
    "was",
    "a",
    "story",
    "and",
    "it",
    "felt",
    "very",
    "quite",
    "plot",
    "actors",
    "film",
    "of",
    "with",
    "really",
    "scene",
    "music",
    "ending",
    "overall",
)


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def sentiment_examples(count: int, seed: int) -> list[dict]:
    """Polar words among a few fillers: label 1 for positive words, 0 for negative ones."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(rng.randint(3, 6))]
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(FILLER))
        records.append({"text": " ".join(words), "label": label})
    return records


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("good_bad")
    for split, count, seed in (("train", 480, 0), ("dev", 200, 1), ("test", 200, 2)):
        write_jsonl(directory / f"{split}.jsonl", sentiment_examples(count, seed))
    return directory


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A random `ElectraForPreTraining` (2 layers, hidden 64) saved with an ELECTRA tokenizer."""
    import torch
    from transformers import ElectraConfig, ElectraForPreTraining

    from dsexit.data import DEFAULT_DATA_URL, save_hf_tokenizer

    directory = tmp_path_factory.mktemp("tiny_export")
    torch.manual_seed(0)
    config = ElectraConfig(
        vocab_size=30522,
        embedding_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    ElectraForPreTraining(config).save_pretrained(directory)
    save_hf_tokenizer(DEFAULT_DATA_URL, str(directory))
    return directory


@pytest.fixture(scope="module")
def first_word_task(tmp_path_factory):
    """The label is the sentence's first word ('yes' or 'no'), followed by random fillers."""
    directory = tmp_path_factory.mktemp("first_word")
    rng = random.Random(0)
    for split, count in (("train", 120), ("dev", 60), ("test", 60)):
        records = []
        for _ in range(count):
            label = rng.randint(0, 1)
            words = ["yes" if label else "no"] + [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
            records.append({"text": " ".join(words), "label": label})
        write_jsonl(directory / f"{split}.jsonl", records)
    return directory
