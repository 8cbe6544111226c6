"""Export a training checkpoint as a Hugging Face directory.

    python launch/export_hf.py CHECKPOINT OUT_DIR [--no-generator]

CHECKPOINT is a checkpoint tag directory (RUN_DIR/checkpoints/global_stepN) or a
checkpoints directory (its newest complete checkpoint is exported). OUT_DIR receives
`ElectraForPreTraining` (the discriminator) and the tokenizer, and OUT_DIR/generator an
`ElectraForMaskedLM`; both load with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import zipfile


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What reading missing, truncated or foreign weight files raises (torch.load, safetensors,
    DeepSpeed's ZeRO consolidation, the checkpoint's own checks)."""
    errors: list[type[BaseException]] = [
        OSError,
        ValueError,
        RuntimeError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


WEIGHT_ERRORS = _weight_errors()


def describe_weight_error(path: str, error: BaseException) -> str:
    """One line: our own messages as they are; a loader's error prefixed with the path it could not read."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if isinstance(error, (OSError, ValueError)) and not text.startswith("[Errno"):
        return text  # a sentence of dsexit's own (CheckpointError is a ValueError)
    return (
        f"the weights in {path!r} could not be read ({type(error).__name__}: {text}); expected a complete checkpoint."
    )


def main(argv: list[str] | None = None) -> int:
    from dsexit.train.cluster.distributed import select_accelerator

    select_accelerator()
    from dsexit.storage import redact_text
    from dsexit.train.checkpoint.files import TRUST_UNVERIFIED_HELP, trust_unverified_checkpoints
    from dsexit.train.export import export_hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--no-generator", action="store_true", help="export only the discriminator")
    parser.add_argument("--trust-unverified-checkpoint", action="store_true", help=TRUST_UNVERIFIED_HELP)
    args = parser.parse_args(argv)
    if args.trust_unverified_checkpoint:
        trust_unverified_checkpoints()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise NotADirectoryError(
                f"OUT_DIR {args.out_dir!r} is a file; expected a directory to write the export to."
            )
        export_hf(args.checkpoint, args.out_dir, with_generator=not args.no_generator)  # reads all, then writes
    except WEIGHT_ERRORS as error:
        print(f"export_hf.py: error: {redact_text(describe_weight_error(args.checkpoint, error))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
