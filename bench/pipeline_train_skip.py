"""Micro-batches the late pipeline stage skips in a real training run (not a forced exit plan).

Launches `launch/pretrain.py` with 2 pipeline stages on 2 processes (the `deepspeed` launcher,
gloo on a CPU), exits on, the controller steering tau toward `--target-compute`. Pinned [CLS] and
[SEP] leave with their sequence's last exitable token, so a micro-batch whose sequences all
finished on stage 1 has no active token on stage 2, which runs none of its layers for it. Reads
the run's metrics.jsonl (`pipeline_stages`, one record per step) and prints, per step after the
exit warmup, tau, the compute fraction and each stage's micro-batches, skipped micro-batches and
executed token-layers, then the totals; writes them to `--out`.

    python bench/pipeline_train_skip.py [--model electra-tiny] [--steps 60] [--target-compute 0.4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="electra-tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--exit-warmup-steps", type=int, default=10)
    parser.add_argument("--target-compute", type=float, default=0.4)
    # The published figures ran before the trainer's floor under tau and the smoke preset's
    # generator temperature: a 60-step run's heads sit near the prior, and this measures the
    # skipping, not what the heads know, so the controller may go as low as it needs.
    parser.add_argument("--min-confidence", type=float, default=0.0)
    parser.add_argument("--generator-temperature", type=float, default=1.0)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--run-dir", default="runs/pipeline_train_skip")
    parser.add_argument("--out", default="bench/results/pipeline_train_skip.json")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args) -> None:
    command = [
        str(Path(sys.executable).with_name("deepspeed")),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "pretrain.py"),
        "--run-dir",
        args.run_dir,
        "--start-over",
        "--model",
        args.model,
        "--deepspeed",
        "ds_configs/pipeline.json",
        "--pipeline-stages",
        "2",
        "--max-steps",
        str(args.steps),
        "--global-batch-size",
        str(args.global_batch_size),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--exit-warmup-steps",
        str(args.exit_warmup_steps),
        "--target-compute",
        str(args.target_compute),
        "--min-confidence",
        str(args.min_confidence),
        "--generator-temperature",
        str(args.generator_temperature),
        "--eval-interval",
        "0",
        "--no-export-hf",
        "--log-interval",
        "1",
        "--progress",
        "lines",
    ]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **os.environ}
    subprocess.run(command, cwd=REPO, env=env, check=True)


def summarise(run_dir: str, exit_warmup_steps: int) -> dict:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {
            "step": record["step"],
            "exit_threshold": record["exit_threshold"],
            "compute_fraction": record["compute_fraction"],
            "pipeline_stages": record["pipeline_stages"],
        }
        for record in records
        if record.get("kind", "train") == "train" and record["step"] > exit_warmup_steps
    ]
    stages = len(steps[0]["pipeline_stages"])
    totals = [
        {
            "stage": stage,
            **{
                name: sum(step["pipeline_stages"][stage][name] for step in steps)
                for name in ("micro_batches", "skipped_micro_batches", "token_layers")
            },
        }
        for stage in range(stages)
    ]
    return {
        "steps_after_warmup": len(steps),
        "steps_with_a_skip_on_the_last_stage": sum(
            step["pipeline_stages"][-1]["skipped_micro_batches"] > 0 for step in steps
        ),
        "mean_compute_fraction": sum(step["compute_fraction"] for step in steps) / len(steps),
        "totals": totals,
        "steps": steps,
    }


def main() -> None:
    args = parse_args()
    launch(args)
    summary = {"settings": vars(args), **summarise(args.run_dir, args.exit_warmup_steps)}
    print(f"{'step':>5} {'tau':>7} {'compute':>8} " + " ".join(f"stage{s}:mb/skip/token-layers" for s in (0, 1)))
    for step in summary["steps"]:
        counters = " ".join(
            f"{c['micro_batches']:>7}/{c['skipped_micro_batches']}/{c['token_layers']:<8}"
            for c in step["pipeline_stages"]
        )
        print(f"{step['step']:>5} {step['exit_threshold']:>7.3f} {step['compute_fraction']:>8.3f} {counters}")
    for total in summary["totals"]:
        print(
            f"stage {total['stage']}: {total['skipped_micro_batches']} of {total['micro_batches']} micro-batches "
            f"skipped, {total['token_layers']} token-layers"
        )
    print(
        f"{summary['steps_with_a_skip_on_the_last_stage']} of {summary['steps_after_warmup']} steps after the "
        f"warmup skipped on the last stage; mean compute fraction {summary['mean_compute_fraction']:.3f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
