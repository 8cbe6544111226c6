"""Command line for data preparation: raw text -> tokenizer -> packed shards + index.json.

Thin wrapper for a source checkout. The program, its usage and exit codes: dsexit/commands/prepare_data.py
(installed as a `dsexit-*` console script).
"""

import sys

from dsexit.commands.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
