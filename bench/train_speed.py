"""The training step's speed where users train it: the trainer's real loop against the bare engine
step and Hugging Face's ELECTRA doing the same work, eager and compiled, in one run.

Every part trains the model of one training preset at that preset's batch (`--preset`: `small` is
ELECTRA-Small, 128 x 128 per step; `smoke` the CPU default), one process, one device:

    loop            `launch/pretrain.py`, the real trainer (engine, data reader, step statistics,
                    exit controller, logging) with exits off; tokens/s from its metrics.jsonl,
                    the first log intervals (warm-up, compilation) left out
    bare            the same engine, built as the trainer builds it, stepping batches already on
                    the device: forward, backward, optimizer step, nothing else
    hf same-work    `transformers`' ElectraForMaskedLM + ElectraForPreTraining, the generator's
                    head on the masked rows only (bench/exit_speed.py's `HFStep`), AdamW, same batch
each eager (`--compile off`) and compiled (`--compile on`; HF through `torch.compile`). The model's
training FLOPs per step come from the FLOP counter; the bf16 share of peak divides the loop's
FLOP/s by the measured bf16 matmul peak (`dsexit.eval.peak`). The last line is

    RESULT train_speed tokens_per_s=X loop_vs_bare=X compiled_vs_eager=X vs_hf_same_work=X
           peak_share_bf16=X device=NAME

tokens_per_s is the faster loop; loop_vs_bare compares loop and bare at the same compile setting;
vs_hf_same_work is that loop against eager HF. Ratios, not absolute times, compare across machines.

    python bench/train_speed.py                          # the CPU: smoke preset
    python bench/train_speed.py --preset small           # a GPU: ELECTRA-Small at 128 x 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="training preset (default: small on CUDA, smoke on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="loop steps (default: 60 on CUDA, 24 on a CPU)")
    parser.add_argument("--log-interval", type=int, default=None, help="loop log interval (default: steps / 6)")
    parser.add_argument("--bare-steps", type=int, default=None, help="timed bare and HF steps (default: 20 / 6)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--parts", nargs="+", default=["loop", "bare", "hf"], choices=["loop", "bare", "hf"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("PART", "RESULT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.preset = args.preset or ("small" if cuda else "smoke")
    args.steps = args.steps or (60 if cuda else 24)
    args.log_interval = args.log_interval or max(1, args.steps // 6)
    args.bare_steps = args.bare_steps or (20 if cuda else 6)
    suffix = "_device" if cuda else ""
    args.out = args.out or RESULTS / f"train_speed{suffix}.json"
    return args


def preset_training(preset: str):
    from dsexit.train.config import preset_config

    config = preset_config(preset)
    return config, config.training


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the trainer's loop (a real run)
def run_loop(args, compile_choice: str, work: Path) -> dict:
    run_dir = work / f"loop-{compile_choice}"
    command = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--preset",
        args.preset,
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(args.steps),
        "--log-interval",
        str(args.log_interval),
        "--eval-interval",
        "0",
        "--save-interval",
        str(10 * args.steps),
        "--no-export-hf",
        "--no-exit",
        "--progress",
        "lines",
        "--compile",
        compile_choice,
        "--compile-backend",
        args.compile_backend,
    ]
    env = {key: value for key, value in os.environ.items() if key not in _WORLD_VARS}
    started = time.time()
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(
            f"the trainer failed ({compile_choice}):\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if record.get("kind", "train") == "train"]
    timed = records[2:] if len(records) > 3 else records[1:]  # warm-up and compilation left out
    steps = sum(record["steps"] for record in timed)
    # Tokens per step are the same in every interval (packed rows): the overall rate weighs each
    # interval by its time.
    seconds_per_token_step = sum(record["steps"] / record["tokens_per_s"] for record in timed)
    first_step = next((line for line in completed.stdout.splitlines() if "first step, compilation" in line), "")
    return {
        "tokens_per_s": steps / seconds_per_token_step,
        "tokens_per_s_by_interval": [record["tokens_per_s"] for record in timed],
        "timed_steps": steps,
        "wall_s": time.time() - started,
        "first_step_line": first_step.split("] ", 1)[-1],
    }


# ---------------------------------------------------------------- the bare engine step (a worker)
def bare_worker(args, compile_choice: str) -> dict:
    from dsexit.model import ElectraExitConfig
    from dsexit.train.cluster.distributed import init_process_group, setup_process
    from dsexit.train.compiling import CompiledForward
    from dsexit.train.config.ds_config import find_ds_config, load_ds_config, resolve_ds_config
    from dsexit.train.engine import build_engine, build_model

    config, training = preset_training(args.preset)
    world, _ = setup_process(cpu_kernels=compile_choice != "on")  # as the trainer starts
    init_process_group(world)
    device = torch.device(args.device)
    model_config = ElectraExitConfig.from_preset(
        config.model.preset, **{**config.model.overrides, "exit_enabled": False}
    )
    with tempfile.TemporaryDirectory() as monitor_dir:
        ds_config = resolve_ds_config(
            load_ds_config(find_ds_config(config.parallelism.deepspeed_config)),
            config,
            dp_size=1,
            total_steps=10**6,
            monitor_dir=monitor_dir,
        )
    engine = build_engine(build_model(model_config, seed=0), ds_config)
    compiled = CompiledForward(engine, device, args.compile_backend) if compile_choice == "on" else None
    accumulation = training.global_batch_size // training.micro_batch_size
    batches = [staged_batch(model_config, training.micro_batch_size, 128, device)]

    def step(index: int) -> None:
        for micro in range(accumulation):
            if compiled is not None:
                compiled.before_forward(None)
            output = engine(**batches[(index * accumulation + micro) % len(batches)])
            engine.backward(output.loss)
            engine.step()

    started = time.perf_counter()
    step(0)
    synchronize(device)
    first = time.perf_counter() - started
    for index in range(1, 3):
        step(index)
    synchronize(device)
    started = time.perf_counter()
    for index in range(args.bare_steps):
        step(index)
    synchronize(device)
    seconds = (time.perf_counter() - started) / args.bare_steps
    flops = training_flops(engine.module, batches[0])
    return {
        "tokens_per_s": training.global_batch_size * 128 / seconds,
        "seconds_per_step": seconds,
        "first_step_s": first,
        "training_flops_per_step": flops * accumulation,
        "precision": str(next(engine.module.parameters()).dtype),
    }


def staged_batch(config, rows: int, seq_len: int, device: torch.device) -> dict:
    """exit_speed's packed batch ([CLS] a [SEP] b [SEP]) on the device, without a mask (no padding)."""
    sys.path.insert(0, str(REPO / "bench"))
    from exit_speed import make_batch  # a sibling benchmark

    input_ids, _, token_type_ids = make_batch(config, rows, seq_len, device)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids}


def training_flops(model, batch: dict) -> float:
    """Forward + backward FLOPs of one micro-batch at full depth (the FLOP counter, one eager forward)."""
    module = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        output = module.forward(**batch)  # the module's own forward: not the compiled call
    return float(output.flops.training_flops)


# ---------------------------------------------------------------- HF same-work (a worker)
def hf_worker(args, compile_choice: str) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from exit_speed import HFStep  # a sibling benchmark

    from dsexit.model import ElectraExitConfig

    config, training = preset_training(args.preset)
    device = torch.device(args.device)
    model_config = ElectraExitConfig.from_preset(
        config.model.preset, **{**config.model.overrides, "exit_enabled": False}
    )
    rows, accumulation = training.micro_batch_size, training.global_batch_size // training.micro_batch_size
    batch = staged_batch(model_config, rows, 128, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    hf = HFStep(
        model_config,
        (batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["token_type_ids"]),
        precision,
        device,
        same_work=True,
    )
    step = torch.compile(hf.__call__) if compile_choice == "on" else hf
    started = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - started
    step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.bare_steps * accumulation):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / args.bare_steps
    return {
        "tokens_per_s": training.global_batch_size * 128 / seconds,
        "seconds_per_step": seconds,
        "first_step_s": first,
    }


def run_worker_process(args, part: str, compile_choice: str, work: Path) -> dict:
    result = work / f"{part}-{compile_choice}.json"
    env = {key: value for key, value in os.environ.items() if key not in _WORLD_VARS}
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{part}:{compile_choice}",
        str(result),
        "--preset",
        args.preset,
        "--bare-steps",
        str(args.bare_steps),
        "--compile-backend",
        args.compile_backend,
    ]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"{part} ({compile_choice}) failed:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------- the report
def summarize(args, parts: dict[str, dict], peak_bf16: float | None, peak_fp32: float | None = None) -> dict:
    from dsexit.eval.peak import device_name

    def rate(name: str) -> float | None:
        return parts[name]["tokens_per_s"] if name in parts else None

    loops = {choice: rate(f"loop-{choice}") for choice in ("off", "on") if rate(f"loop-{choice}")}
    best = max(loops, key=loops.get) if loops else None
    tokens_per_s = loops.get(best) if best else None
    ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
    flops_per_token = None
    for choice in ("off", "on"):
        bare = parts.get(f"bare-{choice}")
        if bare:
            flops_per_token = bare["training_flops_per_step"] / bare["tokens_per_s"] / bare["seconds_per_step"]
    return {
        "device": device_name(args.device),
        "preset": args.preset,
        "tokens_per_s": tokens_per_s,
        "loop_compile": best,
        "loop_vs_bare": ratio(tokens_per_s, rate(f"bare-{best}")) if best else None,
        "compiled_vs_eager": ratio(rate("loop-on"), rate("loop-off")),
        "bare_compiled_vs_eager": ratio(rate("bare-on"), rate("bare-off")),
        "vs_hf_same_work": ratio(tokens_per_s, rate("hf-off")),
        "vs_hf_same_work_compiled": ratio(tokens_per_s, rate("hf-on")),
        "peak_share_bf16": (
            tokens_per_s * flops_per_token / peak_bf16 if tokens_per_s and flops_per_token and peak_bf16 else None
        ),
        "matmul_peak_bf16": peak_bf16,
        "peak_share_fp32": (
            tokens_per_s * flops_per_token / peak_fp32 if tokens_per_s and flops_per_token and peak_fp32 else None
        ),
        "matmul_peak_fp32": peak_fp32,
        "parts": parts,
    }


def fmt(value, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def print_table(results: dict) -> None:
    print(f"\ntrain_speed: {results['preset']} preset on {results['device']}")
    print(f"{'part':<18}{'tokens/s':>12}{'first step s':>14}")
    for name, part in results["parts"].items():
        first = part.get("first_step_s")
        print(f"{name:<18}{part['tokens_per_s']:>12.0f}{fmt(first, '{:.1f}'):>14}")
    print(
        "RESULT train_speed "
        f"tokens_per_s={fmt(results['tokens_per_s'], '{:.0f}')} loop_vs_bare={fmt(results['loop_vs_bare'])} "
        f"compiled_vs_eager={fmt(results['compiled_vs_eager'])} vs_hf_same_work={fmt(results['vs_hf_same_work'])} "
        f"peak_share_bf16={fmt(results['peak_share_bf16'], '{:.4f}')} device={results['device'].replace(' ', '_')}"
    )
    print(
        f"(fp32 matmul peak share: {fmt(results['peak_share_fp32'], '{:.4f}')}; the loop runs the preset's precision)"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        part, compile_choice = args.worker[0].split(":")
        result = (bare_worker if part == "bare" else hf_worker)(args, compile_choice)
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0
    from dsexit.eval.peak import matmul_peak

    device = torch.device(args.device)
    size = 4096 if device.type == "cuda" else 1024
    peak, peak_fp32 = matmul_peak(device, torch.bfloat16, size), matmul_peak(device, torch.float32, size)
    parts: dict[str, dict] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="train_speed-") as work_dir:
        work = Path(work_dir)
        # Eager first, then compiled; each part's result is written as it ends (a run cut off by a
        # time limit still reports what it measured).
        for compile_choice in args.compile:
            for part in args.parts:
                name = f"{part}-{compile_choice}"
                print(f"[train_speed] {name} ...", file=sys.stderr, flush=True)
                if part == "loop":
                    parts[name] = run_loop(args, compile_choice, work)
                else:
                    parts[name] = run_worker_process(args, part, compile_choice, work)
                print(f"[train_speed] {name}: {parts[name]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
                results = summarize(args, parts, peak, peak_fp32)
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
