"""Draw PNG plots of a training run: losses, compute fraction and tau, exit-layer histogram.

    python launch/plot_run.py RUN_DIR [--out DIR]      # default DIR: RUN_DIR/plots

Thin wrapper for a source checkout: the program is dsexit/commands/plot_run.py
(installed as `dsexit-plot`).
"""

import sys

from dsexit.commands.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
