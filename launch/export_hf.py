"""Export a training checkpoint as a Hugging Face directory.

    python launch/export_hf.py CHECKPOINT OUT_DIR [--no-generator]

CHECKPOINT is a checkpoint tag directory (RUN_DIR/checkpoints/global_stepN) or a
checkpoints directory (its newest complete checkpoint is exported). OUT_DIR receives
`ElectraForPreTraining` (the discriminator) and the tokenizer, and OUT_DIR/generator an
`ElectraForMaskedLM`; both load with `from_pretrained`.

Thin wrapper for a source checkout: the program is dsexit/commands/export_hf.py
(installed as `dsexit-export`).
"""

import sys

from dsexit.commands.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
