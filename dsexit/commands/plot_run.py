"""Draw PNG plots of a training run: losses, compute fraction and tau, exit-layer histogram.

python launch/plot_run.py RUN_DIR [--out DIR]      # default DIR: RUN_DIR/plots
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from dsexit.train.plot import plot_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError) as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
