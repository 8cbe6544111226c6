"""Did a change slow a benchmark down? One benchmark, two source trees, launches taking turns.

Runs `SCRIPT ARGS... --out FILE` once per launch for each tree (old, new, old, new, ...), each in its
own tree (working directory and `PYTHONPATH`), so machine noise hits both alike, then sets the figures
each launch wrote side by side: every tree's launches, their spread (max / min - 1 over that tree's
launches), and new / old of the means. A difference counts only where it exceeds both trees' spread.

    git worktree add --detach ../old <commit>
    python bench/compare_trees.py --old ../old --new . --launches 2 \\
        --key "configs.ours fp32 exit=0.00.tokens_per_s" --key full_depth_vs_hf_same_work_fp32 \\
        -- bench/exit_speed.py --precision fp32

`--key` names a figure of the benchmark's JSON by its dotted path (repeatable; default: every number).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def flatten(value, prefix: str = "") -> dict[str, float]:
    """Numbers of a JSON document by dotted path ("configs.ours fp32 exit=0.00.tokens_per_s")."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix[:-1]: float(value)}
    return {}


def run_launch(tree: Path, script: str, script_args: list[str], out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, script, *script_args, "--out", str(out)]
    print(f"  {tree}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return flatten(json.loads(out.read_text()))


def compare(old: list[dict[str, float]], new: list[dict[str, float]], keys: list[str]) -> dict[str, dict]:
    rows = {}
    for key in keys:
        old_values, new_values = [run[key] for run in old], [run[key] for run in new]
        spreads = [
            max(values) / min(values) - 1 if min(values) > 0 else float("nan") for values in (old_values, new_values)
        ]
        ratio = statistics.mean(new_values) / statistics.mean(old_values)
        rows[key] = dict(
            old=old_values,
            new=new_values,
            old_spread=spreads[0],
            new_spread=spreads[1],
            new_over_old=ratio,
            beyond_spread=abs(ratio - 1) > max(spreads),
        )
    return rows


def print_table(rows: dict[str, dict]) -> None:
    width = max(len(key) for key in rows)
    print(f"{'figure':<{width}}  {'old launches':>22}  {'new launches':>22}  {'spread':>13}  {'new/old':>8}  beyond")
    for key, row in rows.items():
        old = " ".join(f"{value:.4g}" for value in row["old"])
        new = " ".join(f"{value:.4g}" for value in row["new"])
        spread = f"{row['old_spread']:.3f}/{row['new_spread']:.3f}"
        beyond = "yes" if row["beyond_spread"] else "no"
        print(f"{key:<{width}}  {old:>22}  {new:>22}  {spread:>13}  {row['new_over_old']:>8.3f}  {beyond}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the tree before the change")
    parser.add_argument("--new", type=Path, default=Path("."), help="the tree after it (default: this one)")
    parser.add_argument("--launches", type=int, default=2, help="launches per tree, taking turns")
    parser.add_argument("--key", action="append", dest="keys", help="a figure's dotted path in the JSON")
    parser.add_argument("--out", default="bench/results/compare_trees.json")
    parser.add_argument("script", help="the benchmark, relative to each tree")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = parser.parse_args(argv)
    script_args = [arg for arg in args.script_args if arg != "--"]
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    for name, tree in trees.items():
        if not (tree / args.script).is_file():
            parser.error(f"--{name} {tree}: no {args.script} there")
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as scratch:
        for launch in range(args.launches):
            for name, tree in trees.items():
                print(f"launch {launch + 1}/{args.launches}, {name} tree", file=sys.stderr, flush=True)
                runs[name].append(run_launch(tree, args.script, script_args, Path(scratch, f"{name}-{launch}.json")))
    common = sorted(set.intersection(*(set(run) for run in runs["old"] + runs["new"])))
    keys = args.keys or common
    missing = [key for key in keys if key not in common]
    if missing:
        parser.error(f"figures not in every launch's JSON: {', '.join(missing)}")
    rows = compare(runs["old"], runs["new"], keys)
    print(
        f"{args.script} {' '.join(script_args)}: old {trees['old']}, new {trees['new']}, {args.launches} launches each"
    )
    print_table(rows)
    record = dict(script=args.script, args=script_args, trees={k: str(v) for k, v in trees.items()}, figures=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    beyond = [key.replace(" ", "_") for key, row in rows.items() if row["beyond_spread"]]
    print(f"RESULT compare_trees figures={len(rows)} beyond_spread={len(beyond)} {' '.join(beyond)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
