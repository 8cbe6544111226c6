"""Fine-tune a pre-trained ELECTRA discriminator on a classification task, or probe it; median over seeds.

Thin wrapper for a source checkout. The program, its usage and exit codes: dsexit/commands/finetune.py
(installed as a `dsexit-*` console script).
"""

import sys

from dsexit.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
