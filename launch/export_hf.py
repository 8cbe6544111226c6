"""Export a training checkpoint as a Hugging Face directory.

Thin wrapper for a source checkout. The program, its usage and exit codes: dsexit/commands/export_hf.py
(installed as a `dsexit-*` console script).
"""

import sys

from dsexit.commands.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
