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
import sys


def main(argv: list[str] | None = None) -> int:
    from dsexit.train.distributed import select_accelerator

    select_accelerator()
    from dsexit.train.export import export_hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--no-generator", action="store_true", help="export only the discriminator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_hf(args.checkpoint, args.out_dir, with_generator=not args.no_generator)
    except FileNotFoundError as error:
        print(f"export_hf.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
