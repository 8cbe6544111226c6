"""Pre-train ELECTRA with token-level early exit on DeepSpeed.

Thin wrapper for a source checkout. The program, its usage and exit codes: dsexit/commands/pretrain.py
(installed as a `dsexit-*` console script).
"""

import sys

from dsexit.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
