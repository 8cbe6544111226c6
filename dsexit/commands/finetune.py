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
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile


def _parser_and_flags() -> tuple[argparse.ArgumentParser, list]:
    """The parser: the run's own arguments, and one flag per `FinetuneConfig` field, generated from the dataclass
    by the generator pretraining's command line uses (the field's docstring is its help)."""
    from dsexit.eval.finetune import FinetuneConfig
    from dsexit.train.checkpoint.files import TRUST_UNVERIFIED_HELP
    from dsexit.train.config.cli import dataclass_flags

    parser = argparse.ArgumentParser(prog="finetune.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", required=True, help="HF ELECTRA export directory or dsexit checkpoint directory")
    add("--task", required=True, help="directory with train/dev/test .jsonl")
    add(
        "--workers",
        type=int,
        default=1,
        help="seeds run in this many processes at once, sharing the threads (several seeds on a many-core CPU) "
        "(default: 1)",
    )
    add("--export-dir", help="where a checkpoint given as --model is exported (default: a temporary directory)")
    add("--trust-unverified-checkpoint", action="store_true", help=TRUST_UNVERIFIED_HELP)
    add("--out", help="write per-seed and median metrics to this JSON file")
    recipe = parser.add_argument_group("recipe", inspect.getdoc(FinetuneConfig))
    return parser, dataclass_flags(recipe, FinetuneConfig, "", FinetuneConfig())


def build_parser() -> argparse.ArgumentParser:
    return _parser_and_flags()[0]


def parse_args(argv: list[str] | None = None):
    """(the parsed arguments, the `FinetuneConfig` they give: the defaults, with the flags given over them)."""
    from dsexit.eval.finetune import FinetuneConfig
    from dsexit.train.config.cli import given_fields

    parser, flags = _parser_and_flags()
    args = parser.parse_args(argv)
    return args, FinetuneConfig(**given_fields(args, flags))


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
    from dsexit.eval.finetune import finetune
    from dsexit.eval.model_dir import ModelDirError, resolve_model_dir
    from dsexit.eval.tasks import TaskError, load_task

    args, config = parse_args(argv)
    if args.trust_unverified_checkpoint:
        from dsexit.train.checkpoint.files import trust_unverified_checkpoints

        trust_unverified_checkpoints()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [finetune] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("dsexit").setLevel(logging.INFO)
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
