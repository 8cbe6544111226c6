"""Draw PNG plots of a training run: losses, compute fraction and tau, exit-layer histogram.

Thin wrapper for a source checkout. The program, its usage and exit codes: dsexit/commands/plot_run.py
(installed as a `dsexit-*` console script).
"""

import sys

from dsexit.commands.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
