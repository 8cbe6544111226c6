"""How confident are a trained model's exit heads? The measurement behind `exit_control.min_confidence`.

For each checkpoint given, every head's `prior_margin` confidence |tanh((x - x0) / 2)| is
collected over the tokens that may exit, on the held-out samples the trainer evaluates (the run's
own data and seed), at full depth, under the evaluator's two corruptions (uniform replacement and
the run's generator). It prints, per head, quantiles of the confidence and the share of tokens at
or above each candidate floor, and writes them as JSON. A floor should sit above what heads at the
replaced-token prior reach (a discriminator that learned nothing) and below what heads that
learned reach on a good share of their tokens.

    python bench/head_confidence.py --run LABEL=RUN_DIR [--run LABEL=RUN_DIR ...] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsexit.data import DatasetIndex, read_validation_samples  # noqa: E402
from dsexit.data.stats import token_counts  # noqa: E402
from dsexit.model.exit_rules.confidence import margin_from  # noqa: E402
from dsexit.train.checkpoint.files import open_checkpoint  # noqa: E402
from dsexit.train.export import data_url_of, load_trained_model  # noqa: E402
from dsexit.train.heldout import HeldOutEvaluator  # noqa: E402

CANDIDATE_FLOORS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def head_confidences(run_dir: str, eval_samples: int, seed: int) -> tuple[dict[int, torch.Tensor], int]:
    """Each head's confidences on the held-out tokens that may exit ([CLS], [SEP] and padding left out), at
    full depth."""
    ref = open_checkpoint(str(Path(run_dir) / "checkpoints"))
    model = load_trained_model(ref)
    dataset = DatasetIndex.load(data_url_of(ref))
    evaluator = HeldOutEvaluator(
        read_validation_samples(dataset, eval_samples),
        model.config,
        unigram_counts=token_counts(dataset, max_shards=8),
        seed=seed,
    )
    prior_logit = model.config.prior_logit
    collected: dict[int, list[torch.Tensor]] = {}
    exitable_per_pass: list[tuple[torch.Tensor, torch.Tensor]] = []
    discriminate = evaluator._discriminate

    def remember_exitable(model, ids, mask, types, exitable, exit_threshold):
        exitable_per_pass.append((exitable.bool(), mask.bool()))
        return discriminate(model, ids, mask, types, exitable, exit_threshold)

    evaluator._discriminate = remember_exitable  # which rows a head saw are tokens that may exit
    handles = []
    discriminator = model.discriminator
    heads = {int(name): head for name, head in discriminator.exit_heads.items()}
    heads[discriminator.num_layers] = discriminator.discriminator_predictions  # the last layer's, for reference
    for layer, head in heads.items():

        def keep(module, inputs, output, layer=layer):
            exitable, real = exitable_per_pass[-1]
            confidences = margin_from(output.reshape(-1), prior_logit)
            # Exit heads see the real tokens (row-major); the last layer's head runs on every position.
            keep_rows = exitable.reshape(-1) if confidences.numel() == exitable.numel() else exitable[real]
            collected.setdefault(layer, []).append(confidences[keep_rows])

        handles.append(head.register_forward_hook(keep))
    evaluator.evaluate(model, None)
    for handle in handles:
        handle.remove()
    return {layer: torch.cat(parts) for layer, parts in sorted(collected.items())}, ref.step


def summarize(confidences: torch.Tensor) -> dict:
    values = confidences.float()
    return {
        "tokens": values.numel(),
        "quantiles": {str(q): float(values.quantile(q)) for q in QUANTILES},
        "share_at_or_above": {str(floor): float((values >= floor).float().mean()) for floor in CANDIDATE_FLOORS},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234, help="the run's seed (the evaluator's corruption)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "head_confidence.json")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.run:
        label, _, run_dir = spec.partition("=")
        per_head, step = head_confidences(run_dir, args.eval_samples, args.seed)
        rows.append({"label": label, "run_dir": run_dir, "step": step, "heads": {}})
        for layer, confidences in per_head.items():
            summary = summarize(confidences)
            rows[-1]["heads"][str(layer)] = summary
            quantiles = " ".join(f"q{float(q) * 100:.0f}={v:.3f}" for q, v in summary["quantiles"].items())
            shares = " ".join(f">={floor}:{share:.2f}" for floor, share in summary["share_at_or_above"].items())
            print(f"{label} step={step} head={layer} {quantiles} | {shares}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"floors": CANDIDATE_FLOORS, "runs": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
