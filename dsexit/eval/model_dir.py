"""What `--model` names: a Hugging Face ELECTRA export, or a dsexit checkpoint to export first.

A checkpoint is converted by the trainer's own export (`dsexit.train.export.export_hf`),
so fine-tuning sees exactly what `launch/export_hf.py` writes.
"""

from __future__ import annotations

import json
import os
import tempfile

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


class ModelDirError(ValueError):
    """The model path is not something fine-tuning can load."""


def _check_export(path: str) -> str:
    with open(os.path.join(path, "config.json")) as handle:
        try:
            model_type = json.load(handle).get("model_type")
        except json.JSONDecodeError:
            model_type = None
    if model_type != "electra":
        raise ModelDirError(
            f"model {path!r} is not an ELECTRA export (config.json has model_type={model_type!r}); "
            f"expected a directory written by launch/export_hf.py or a dsexit checkpoint."
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ModelDirError(
            f"model {path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); expected an export "
            f"with its tokenizer, as launch/export_hf.py writes it."
        )
    return path


def resolve_model_dir(path: str, export_dir: str | None = None) -> tuple[str, str]:
    """(Hugging Face directory to load, "export" or "checkpoint"); checks before any training.

    A checkpoint (a tag directory or a checkpoints root) is exported to `export_dir`, or to a
    fresh temporary directory that the caller may delete.
    """
    if not os.path.isdir(path):
        raise ModelDirError(
            f"model {path!r} does not exist; expected an ELECTRA export directory or a dsexit checkpoint."
        )
    if os.path.isfile(os.path.join(path, "config.json")):
        return _check_export(path), "export"
    from dsexit.train.checkpoint.files import MARKER, newest_complete, read_marker

    if read_marker(path) is None and newest_complete(path) is None:
        raise ModelDirError(
            f"model {path!r} is not an ELECTRA export (no config.json) nor a dsexit checkpoint "
            f"(no {MARKER}); expected a directory written by launch/export_hf.py or a checkpoint."
        )
    from dsexit.train.cluster.distributed import select_accelerator

    select_accelerator()  # before DeepSpeed is imported (ZeRO checkpoints are consolidated by it)
    from dsexit.train.export import export_hf

    out_dir = export_dir or tempfile.mkdtemp(prefix="dsexit-finetune-export-")
    export_hf(path, out_dir, with_generator=False)
    return _check_export(out_dir), "checkpoint"
