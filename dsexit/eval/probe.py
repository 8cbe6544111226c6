"""Frozen-feature linear probe: logistic regression on the discriminator's final [CLS] state.

A cheap measure of representation quality, free of fine-tuning noise. The encoder is
never trained: each example's first-token hidden state after the last layer (full depth,
eval mode, so no dropout, fp32) is extracted once per model and shared by its seeds. The
features are standardised with the train split's mean and deviation, and a linear
classifier with an L2 penalty on its weights is fitted by full-batch L-BFGS. The problem is
convex, so the seed (which only draws the initial weights) moves the result by little more
than the solver's tolerance.

    features = extract_features(model_dir, encode_task(model_dir, task, config), batch_size=128)
    run = probe_seed(features, task.num_labels, config, seed=1)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dsexit.eval.metrics import classification_metrics

if TYPE_CHECKING:
    from dsexit.eval.finetune import EncodedSplit, FinetuneConfig

log = logging.getLogger("dsexit.eval")


@dataclass
class Features:
    inputs: torch.Tensor
    """[examples, hidden] float32, standardised with the train split's statistics."""
    labels: torch.Tensor
    """[examples] class indices."""


def extract_features(
    model_dir: str, data: dict[str, EncodedSplit], batch_size: int, device: torch.device | None = None
) -> dict[str, Features]:
    """Final-layer first-token states of every split, standardised; the encoder is only read."""
    from transformers import ElectraModel

    device = device or torch.device("cpu")
    encoder = ElectraModel.from_pretrained(model_dir).to(device).eval()
    raw: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, split in data.items():
            chunks = []
            for start in range(0, len(split), batch_size):
                batch = split.batch(list(range(start, min(start + batch_size, len(split)))), device)
                batch.pop("labels")
                chunks.append(encoder(**batch).last_hidden_state[:, 0].float().cpu())
            raw[name] = torch.cat(chunks)
    mean = raw["train"].mean(0)
    deviation = raw["train"].std(0, unbiased=False).clamp_min(1e-6)  # a constant feature stays zero
    return {
        name: Features((inputs - mean) / deviation, torch.tensor(data[name].labels)) for name, inputs in raw.items()
    }


def fit_linear_probe(
    train: Features, num_labels: int, l2: float, max_iterations: int, seed: int
) -> tuple[torch.nn.Linear, float]:
    """Logistic regression: mean cross-entropy + l2 * |weights|^2 (bias free), by L-BFGS; returns it and its loss."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(train.inputs.shape[1], num_labels)
    optimizer = torch.optim.LBFGS(
        probe.parameters(),
        lr=1.0,
        max_iter=max_iterations,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def penalised_loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(probe(train.inputs), train.labels) + l2 * probe.weight.square().sum()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = penalised_loss()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        return probe, float(penalised_loss())


def probe_seed(features: dict[str, Features], num_labels: int, config: FinetuneConfig, seed: int) -> dict[str, Any]:
    """One probe fit; the same run record as `finetune_seed` gives, with the fit as its single epoch."""
    started = time.perf_counter()
    probe, train_loss = fit_linear_probe(
        features["train"], num_labels, config.probe_l2, config.probe_max_iterations, seed
    )
    record: dict[str, Any] = {"epoch": 1, "train_loss": train_loss}
    with torch.no_grad():
        for split in ("dev", "test"):
            predictions = probe(features[split].inputs).argmax(-1).tolist()
            record[split] = classification_metrics(features[split].labels.tolist(), predictions, num_labels)
    if config.progress != "none":
        log.info(
            "seed=%d probe train_loss=%.4f dev_acc=%.4f test_acc=%.4f",
            seed,
            train_loss,
            record["dev"]["accuracy"],
            record["test"]["accuracy"],
        )
    return {
        "seed": seed,
        "selected_epoch": 1,
        "dev": record["dev"],
        "test": record["test"],
        "epochs": [record],
        "seconds": time.perf_counter() - started,
        "bf16": False,
    }
