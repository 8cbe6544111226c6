"""Exact resume on this machine's accelerator: a run killed after a checkpoint and resumed equals
an uninterrupted one.

Three trainer runs (`launch/pretrain.py`, one process, the DeepSpeed config given, ZeRO-2 by
default): an uninterrupted run of `--steps` steps, and the same run killed from outside (SIGKILL)
once it has logged a step past the checkpoint at `--save-at`, then restarted with `--resume auto`.
The resumed steps must see exactly the same samples (the data-order digest of every step) and
give the same losses: bitwise on a CPU; on a GPU with `-- --deterministic` (deterministic kernels)
bitwise too. Without it, atomics in the embedding, scatter and attention backward passes make two
GPU runs drift apart from the first step (the generator's discrete sampling amplifies it), so
an uninterrupted run is no reference there; the steps the killed run logged past its checkpoint
are compared with the resumed ones as well.

    python bench/resume_check.py [--model electra-small] [--steps 40] [--save-at 20]

Last line: RESULT resume_check exact_order=yes|no max_loss_diff=X steps_compared=N
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_steps(run_dir: Path) -> dict[int, dict]:
    records = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind", "train") == "train" and "step" in record:
                records[record["step"]] = record
    return records


def trainer(run_dir: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--deepspeed",
        args.deepspeed,
        "--model",
        args.model,
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(args.steps),
        "--save-interval",
        str(args.save_at),
        "--keep-last",
        "3",
        "--log-interval",
        "1",
        "--seed",
        "7",
        "--global-batch-size",
        str(args.batch),
        "--micro-batch-size",
        str(args.batch),
        "--warmup-steps",
        "5",
        "--eval-interval",
        "0",
        "--no-export-hf",
        "--no-tensorboard",
        "--no-csv",
        "--progress",
        "lines",
        "--exit",
        "--target-compute",
        "0.75",
        "--exit-warmup-steps",
        "5",
        *args.trainer_args,
        *extra,
    ]


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"resume_check: {' '.join(command[:3])} failed (exit {code}); see {log}")


def run_and_kill(command: list[str], run_dir: Path, kill_after_step: int, total_steps: int, log: Path) -> None:
    """Start the run and SIGKILL its process group once it has logged `kill_after_step`."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        deadline = time.time() + 900
        while process.poll() is None and time.time() < deadline:
            if max(read_steps(run_dir), default=0) >= kill_after_step:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        process.wait()
    if max(read_steps(run_dir), default=0) >= total_steps:
        raise SystemExit("resume_check: the run finished before it could be killed; use more --steps")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="electra-small")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-at", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=0.0, help="max loss difference")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "resume_check")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "resume_check.json")
    parser.add_argument("trainer_args", nargs="*", help="extra trainer flags (after --)")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    tolerance = args.tolerance if args.tolerance is not None else 0.0
    straight, interrupted = args.work_dir / "straight", args.work_dir / "interrupted"
    for path in (straight, interrupted):
        if path.exists():
            import shutil

            if any(path.iterdir()) and not (path / "metrics.jsonl").exists():
                raise SystemExit(
                    f"resume_check: {path} exists and is not a trainer run of this script; "
                    f"expected an empty or absent directory (pick another --work-dir)"
                )
            shutil.rmtree(path)  # a trainer run this script left behind
        path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"resume_check: uninterrupted {args.steps} steps ({args.model}, {args.deepspeed})", flush=True)
    run(trainer(straight, args), args.work_dir / "straight.log")
    print(f"resume_check: killed after step {args.save_at + 3}, then --resume auto", flush=True)
    run_and_kill(trainer(interrupted, args), interrupted, args.save_at + 3, args.steps, args.work_dir / "killed.log")
    killed = read_steps(interrupted)  # the steps it logged past the checkpoint before the kill
    run(trainer(interrupted, args, "--resume", "auto"), args.work_dir / "resumed.log")
    reference, resumed = read_steps(straight), read_steps(interrupted)
    own = [step for step in killed if step > args.save_at and step in resumed]
    own_diff = max((abs(killed[s]["loss"] - resumed[s]["loss"]) for s in own), default=float("nan"))
    compared = [step for step in range(args.save_at + 1, args.steps + 1) if step in reference and step in resumed]
    if len(compared) != args.steps - args.save_at:
        raise SystemExit(
            f"resume_check: expected steps {args.save_at + 1}..{args.steps} in both runs, compared {len(compared)}"
        )
    same_order = all(reference[s]["samples_digest"] == resumed[s]["samples_digest"] for s in compared)
    differences = [abs(reference[s]["loss"] - resumed[s]["loss"]) for s in compared]
    max_diff = max(differences)
    ok = same_order and max_diff <= tolerance
    results = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "model": args.model,
        "deepspeed": args.deepspeed,
        "steps": args.steps,
        "save_at": args.save_at,
        "steps_compared": len(compared),
        "exact_order": same_order,
        "max_loss_diff": max_diff,
        "tolerance": tolerance,
        "deterministic": "--deterministic" in args.trainer_args,
        "steps_compared_with_killed_run": len(own),
        "max_loss_diff_vs_killed_run": own_diff,
        "passed": ok,
        "seconds": time.time() - started,
        "losses": {s: [reference[s]["loss"], resumed[s]["loss"]] for s in compared},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'step':>5} {'uninterrupted':>14} {'resumed':>10} {'same samples':>13}")
    for step in compared:
        print(
            f"{step:>5} {reference[step]['loss']:>14.6f} {resumed[step]['loss']:>10.6f} "
            f"{str(reference[step]['samples_digest'] == resumed[step]['samples_digest']):>13}"
        )
    print(
        f"the killed run's own steps {own[0] if own else '-'}..{own[-1] if own else '-'} against the resumed ones: "
        f"max loss difference {own_diff:.3g}"
    )
    print(
        f"RESULT resume_check exact_order={'yes' if same_order else 'no'} max_loss_diff={max_diff:.3g} "
        f"steps_compared={len(compared)} passed={'yes' if ok else 'no'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
