"""Fine-tune a pre-trained ELECTRA discriminator on a classification task, or probe it; median over seeds.

    python launch/finetune.py --model runs/electra/hf --task ../shared/data/downstream/rt_sentiment
    python launch/finetune.py --model runs/electra/checkpoints --task DIR --seeds 5 --select best-dev --out r.json
    python launch/finetune.py --model runs/electra/hf --task DIR --mode probe

The defaults are ELECTRA-Small's published fine-tuning recipe (lr 3e-4, layer-wise
learning-rate decay 0.8, warmup 10%, weight decay 0.01, 3 epochs, 10 for RTE/STS).
--mode probe fits a linear classifier on frozen final-layer [CLS] features instead.

--model is a Hugging Face export (launch/export_hf.py) or a dsexit checkpoint (a tag
directory or a checkpoints root; it is exported first with the trainer's export code).
--task holds train/dev/test .jsonl with `text` (or `text_a`/`text_b`) and an integer `label`.
Prints per-seed and median dev/test accuracy, F1 and MCC; --out writes them as JSON.
Runs as one process; under a multi-process launcher only rank 0 works.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

TASK_DEFAULT = "task default"


def epoch_count(text: str) -> int | None:
    """--epochs: a number, or 'task default' (None: ELECTRA's epochs for the task)."""
    return None if text == TASK_DEFAULT else int(text)


def build_parser() -> argparse.ArgumentParser:
    from dsexit.eval.finetune import MODES, PRECISIONS, SELECT_MODES, FinetuneConfig

    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--model", required=True, help="HF ELECTRA export directory or dsexit checkpoint directory")
    add("--task", required=True, help="directory with train/dev/test .jsonl")
    add("--seeds", type=int, default=defaults.seeds, help="fine-tuning runs (seeds first-seed, first-seed+1, ...)")
    add("--first-seed", type=int, default=defaults.first_seed)
    add(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="fine-tune the whole model, or fit a linear probe on frozen final-layer [CLS] features",
    )
    add("--lr", type=float, default=defaults.lr)
    add(
        "--layerwise-lr-decay",
        type=float,
        default=defaults.layerwise_lr_decay,
        help="ELECTRA's rule: the head gets --lr, each encoder layer down one factor less; 1.0 disables",
    )
    add(
        "--epochs",
        type=epoch_count,
        default=TASK_DEFAULT,
        help="passes over the train split; by default ELECTRA's per task: 10 for RTE/STS, else 3",
    )
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--max-seq-len", type=int, default=defaults.max_seq_len)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    add(
        "--select",
        choices=SELECT_MODES,
        default=defaults.select,
        help="per seed: metrics after the last epoch, or the best-dev epoch's",
    )
    add("--precision", choices=PRECISIONS, default=defaults.precision, help="bf16 autocast where native ('auto')")
    add("--max-train-examples", type=int, help="train on N examples, a stratified subsample (quick runs)")
    add("--max-eval-examples", type=int, help="evaluate on N dev/test examples, a stratified subsample (smoke runs)")
    add(
        "--subsample-seed",
        type=int,
        default=defaults.subsample_seed,
        help="draws the subsamples; the same for every fine-tuning seed",
    )
    add("--probe-l2", type=float, default=defaults.probe_l2, help="--mode probe: L2 penalty on the weights")
    add(
        "--probe-max-iterations",
        type=int,
        default=defaults.probe_max_iterations,
        help="--mode probe: L-BFGS iterations at most",
    )
    add("--progress", choices=("auto", "bar", "lines", "none"), default=defaults.progress)
    add(
        "--workers",
        type=int,
        default=1,
        help="seeds run in this many processes at once, sharing the threads (several seeds on a many-core CPU)",
    )
    add("--export-dir", help="where a checkpoint given as --model is exported (default: a temporary directory)")
    add("--out", help="write per-seed and median metrics to this JSON file")
    return parser


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def unreadable(path: str, error: Exception) -> str:
    """One line for weights that could not be read; dsexit's own sentences pass as they are."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if isinstance(error, (OSError, ValueError)) and not text.startswith("[Errno"):
        return text
    return f"the weights in {path!r} could not be read ({type(error).__name__}: {text}); expected a complete model."


def check_weights(model_dir: str) -> None:
    """The export's weights are there and load, before any fine-tuning starts (a truncated file would
    otherwise fail inside every seed's run)."""
    import torch

    from dsexit.eval.model_dir import ModelDirError

    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not present:
        raise ModelDirError(
            f"model {model_dir!r} has no weights ({' or '.join(WEIGHT_FILES)}); expected a complete "
            f"export as launch/export_hf.py writes it."
        )
    path = os.path.join(model_dir, present[0])
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(path)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, or not a weights file: whatever the loader raises
        raise ModelDirError(unreadable(path, error)) from None


def print_summary(result: dict) -> None:
    rows = [(f"seed {run['seed']}", run) for run in result["per_seed"]] + [("median", result["median"])]
    print(f"{'':>8} | {'dev acc':>7} {'dev F1':>7} {'dev MCC':>7} | {'test acc':>8} {'test F1':>7} {'test MCC':>8}")
    for name, metrics in rows:
        dev, test = metrics["dev"], metrics["test"]
        print(
            f"{name:>8} | {dev['accuracy']:7.4f} {dev['f1']:7.4f} {dev['mcc']:7.4f} | "
            f"{test['accuracy']:8.4f} {test['f1']:7.4f} {test['mcc']:8.4f}"
        )
    print(f"({result['protocol']})")


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process does the work; other ranks of a launcher have nothing to do
    from dsexit.eval.finetune import FinetuneConfig, finetune
    from dsexit.eval.model_dir import ModelDirError, resolve_model_dir
    from dsexit.eval.tasks import TaskError, load_task

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [finetune] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("dsexit").setLevel(logging.INFO)
    config = FinetuneConfig(
        mode=args.mode,
        lr=args.lr,
        layerwise_lr_decay=args.layerwise_lr_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup_fraction,
        seeds=args.seeds,
        first_seed=args.first_seed,
        select=args.select,
        precision=args.precision,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        subsample_seed=args.subsample_seed,
        probe_l2=args.probe_l2,
        probe_max_iterations=args.probe_max_iterations,
        progress=args.progress,
    )
    # A checkpoint given as --model is exported here unless --export-dir says where; removed at the end,
    # also when the export fails.
    scratch_export = tempfile.mkdtemp(prefix="dsexit-finetune-export-") if args.export_dir is None else None
    try:
        config.validate()
        task = load_task(args.task)  # every user error surfaces before any training
        try:
            model_dir, _ = resolve_model_dir(args.model, args.export_dir or scratch_export)
            check_weights(model_dir)
        except ModelDirError:
            raise
        except Exception as error:  # exporting a checkpoint: missing, truncated or foreign weight files
            raise ModelDirError(unreadable(args.model, error)) from None
        result = finetune(model_dir, task, config, workers=args.workers)
    except (TaskError, ModelDirError, ValueError, FileNotFoundError) as error:
        from dsexit.storage import redact_text

        print(f"finetune.py: error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    finally:
        if scratch_export:
            shutil.rmtree(scratch_export, ignore_errors=True)
    result["model"] = args.model
    print_summary(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
