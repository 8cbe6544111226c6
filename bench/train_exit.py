"""Do exits save time in real training? The trainer's step at target compute 1.0, 0.75 and 0.5.

Each arm is a DeepSpeed engine (one rank, ZeRO-2 from ds_configs/zero2.json, the precision the
trainer would pick: bf16 where the hardware has it) stepped by the trainer's own data-parallel step
runner (`dsexit.train.step_runner.DataParallelSteps`: forward, backward, optimizer step), with its
`StepStats` and the real `ExitController` steering tau toward the arm's target compute. Nothing is
forced: tokens exit where their heads are confident enough, every exit head runs on every token that
reaches it, deep supervision and routing included.

Arms, per exit-head variant (`--variants`):
    plain                 exits off, no heads: ELECTRA as HF computes it (the reference)
    VARIANT@1.00          heads present and trained, nothing exits: the machinery's own cost
    VARIANT@0.75, @0.50   the controller steers the compute fraction to the target
Variants: dense (HF's H->H->1 head at every layer from min_exit_layer, the default), linear
(`--exit-head linear`: H->1), linear-k2 (linear heads every 2nd layer), dense-s25 (dense heads,
deep supervision on a 25% sample of the tokens), dense-drop, linear-drop and linear-k2-drop (the same
with `--exit-kv drop`: exited tokens leave the keys and values of later layers, whose cost then falls
with the active tokens alone).

`--compile` compiles each arm's training forward as the trainer's `--compile on` does (fullgraph, static
shapes; CUDA graphs on a GPU), the plain arm's too, so speedups are against the compiled full-depth step.
Capacity and random routing stay compiled; threshold routing falls back to eager once exits start, as in
the trainer. With `--compile` (or `--fixed-capacity`) a capacity arm runs at its target's level from the
first step (level round(16 x target): one graph per arm, no recompilation while a controller moves).
The layer clock runs only eager on a CPU (its hooks would break a compiled graph, and on a GPU a host
clock does not time the device): elsewhere the measured ideal is left out. On a GPU the arms run in
bf16 (`--precision auto`).

Routings (`--routing`, the model's `exit_routing`; each exit arm runs once per routing named):
threshold (the default: tau steered by the threshold controller) or capacity / random (a fixed
number of rows per sequence continue after each head, the level steered by the capacity controller,
`--capacity-interval` steps apart; its @1.00 arm runs the capacity path at full capacity). Arms of
another routing than threshold are named VARIANT@TARGET:ROUTING.

Every arm runs in a process of its own, as a training run does: `--settle` untimed steps (the
controller reaches its target), then `--steps` timed ones. The arms' processes take turns, one at a
time, and the whole turn repeats `--launches` times, so machine noise hits all alike; each arm's
figure pools its launches. (One process holding every arm's engine measured something else: with 13
engines in it, plain ran 15% slower than alone and the exit arms 9% slower, which overstated the
speedup at 0.75.) A worker starts as the trainer does (`setup_process`): on a CPU with glibc's malloc
tuned, or tcmalloc where `LD_PRELOAD` or `DSEXIT_TCMALLOC=auto` asks for it (docs/cpu.md); the table
and the RESULT line name the allocator.

Speedup = the plain arm's step time / the arm's; ideal = the FLOP counter's training FLOPs of the
plain arm / the arm's, over the same timed steps; efficiency = speedup / ideal. The ideal assumes
every FLOP of the step costs the same time. The run checks that: hooks time each step's
discriminator layers and heads (forward from layer 1's input to the last layer's output, backward
from the loss to the gradient at layer 1's input), and the FLOP counter splits the FLOPs the same
way. Exits shrink only that part; the rest (generator, sampling, embeddings, optimizer step) is the
same work in every arm. The measured ideal keeps the plain arm's rest as measured and scales its
layers' time by the arm's layer FLOPs: plain / (plain rest + plain layers x arm layer FLOPs / plain
layer FLOPs). Efficiency against it says what the exit machinery delivers of what is attainable;
the FLOP ideal also charges the rest's lower FLOP rate to it. The measured ideal assumes the rest
takes the plain arm's time in every arm; the run prints what it took in each, as the check.
The same run measures the bf16 and fp32 matmul peaks and reports the plain arm's FLOP/s as a share of
each (the RESULT line's first share is of the precision the arms ran in).

The step has the shape of the training preset that trains `--preset` (electra-small: the `small`
preset, one micro-batch of 128 x 128 per optimizer step, as Clark et al.): the optimizer step and
ZeRO's bookkeeping cost the same per step whatever its batch, so a smaller batch than users run
would hand them a larger share of the step than training gives them. `--batch` (and `--accumulation`)
measure another shape.

    python bench/train_exit.py [--preset electra-small] [--batch 128] [--variants dense linear]
        [--routing threshold capacity] [--compile] [--targets 0.75 0.5]
    python bench/train_exit.py --variants dense dense-drop --routing capacity --compile   # on a GPU

One RESULT line per routing and variant, each routing's best first (the best speedup at 0.75):
RESULT train_exit train_efficiency_at_75=X train_efficiency_at_50=X train_speedup_at_75=X
train_speedup_at_50=X variant=NAME routing=NAME exit_kv=MODE compiled=yes|no device=NAME ... (and,
where the layer clock ran, the efficiency against the measured ideal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

VARIANTS = {
    "dense": {},
    "linear": {"exit_head": "linear"},
    "linear-k2": {"exit_head": "linear", "exit_interval": 2},
    "dense-s25": {"exit_supervision": 0.25},
    "dense-drop": {"exit_kv": "drop"},
    "linear-drop": {"exit_head": "linear", "exit_kv": "drop"},
    "linear-k2-drop": {"exit_head": "linear", "exit_interval": 2, "exit_kv": "drop"},
}
TARGETS = (1.0, 0.75, 0.5)
ROUTINGS = ("threshold", "capacity", "random")
PER_STEP = ("seconds", "flops", "compute", "layer_seconds", "layer_flops")  # what a worker measures per timed step


@dataclass
class Arm:
    name: str
    overrides: dict
    target: float | None  # None: plain (no exits); 1.0: exits on, nothing exits
    routing: str = "threshold"
    runner: object = None
    controller: object = None
    step: int = 0
    seconds: list[float] = field(default_factory=list)
    flops: list[int] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    layer_flops: list[int] = field(default_factory=list)
    threads: int = 0
    host_allocator: str = ""
    peak_rss_bytes: int = 0  # the largest resident set of its processes
    clock: object = None  # LayerClock: eager on a CPU only


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument(
        "--batch",
        type=int,
        help="micro-batch rows (default: the micro-batch of the training preset that trains --preset; "
        "electra-small's `small`: 128, as Clark et al.)",
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        help="micro-batches per optimizer step (default: 1 with --batch, else that training preset's global / "
        "micro batch)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--routing", nargs="+", default=["threshold"], choices=ROUTINGS, help="exit routings timed")
    parser.add_argument(
        "--capacity-interval", type=int, default=2, help="capacity routing: steps between changes of the level"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        type=float,
        default=list(TARGETS),
        help="the exit arms' target compute (0.75 and 0.5 at least; default 1.0 0.75 0.5)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every arm's training forward under torch.compile, as the trainer's --compile on (see above)",
    )
    parser.add_argument(
        "--fixed-capacity",
        action="store_true",
        help="capacity and random arms at their target's level from the first step (the default with --compile)",
    )
    parser.add_argument("--settle", type=int, default=10, help="untimed steps per arm process before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm process")
    parser.add_argument("--launches", type=int, default=2, help="processes per arm, taking turns with the others")
    parser.add_argument(
        "--gain",
        type=float,
        default=1.0,
        help="the controller's gain (the trainer's default is 4; lower settles smoothly in few steps)",
    )
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--deepspeed", default="zero2.json")
    parser.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="matmul size for the peaks (a CPU without native bf16 emulates the bf16 one: slow at 2048)",
    )
    parser.add_argument("--out", default="bench/results/train_exit.json")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "RESULT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not {0.75, 0.5} <= set(args.targets) or not set(args.targets) <= set(TARGETS):
        parser.error(f"--targets {args.targets}: expected 0.75 and 0.5, and 1.0 if wanted")
    args.targets = [target for target in TARGETS if target in args.targets]
    args.fixed_capacity = args.fixed_capacity or args.compile
    if args.batch is None:
        args.batch, default_accumulation = training_preset_batch(args.preset)
    else:
        default_accumulation = 1
    args.accumulation = args.accumulation or default_accumulation
    return args


def training_preset_batch(model_preset: str) -> tuple[int, int]:
    """(micro-batch rows, micro-batches per step) of the training preset that trains `model_preset`.

    The optimizer step and ZeRO's bookkeeping cost the same per step whatever the batch, so the
    step's shape decides what share of it exits can reach: measured at the shape a user runs."""
    from dsexit.train.config import TRAIN_PRESETS, preset_config

    for name, values in TRAIN_PRESETS.items():
        if values["model"]["preset"] == model_preset:
            training = preset_config(name).training
            return training.micro_batch_size, training.global_batch_size // training.micro_batch_size
    raise SystemExit(f"--preset {model_preset}: no training preset trains it; pass --batch")


def batches(config, batch: int, seq_len: int, device):
    """Random token rows shaped like packed text: [CLS] a [SEP] b [SEP], one new batch per step."""
    step = 0
    while True:
        generator = torch.Generator().manual_seed(step)
        input_ids = torch.randint(1000, config.vocab_size, (batch, seq_len), generator=generator)
        input_ids[:, 0] = config.cls_token_id
        input_ids[:, seq_len // 2] = config.sep_token_id
        input_ids[:, -1] = config.sep_token_id
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[:, seq_len // 2 + 1 :] = 1
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_type_ids}
        step += 1


class LayerClock:
    """Seconds a step spends in the discriminator's layers and heads, from hooks: forward from layer 1's
    input to the last layer's output, backward from the start of `engine.backward` (the loss and the
    heads come first) to the gradient at layer 1's input. The generator's backward runs after it: its
    nodes were all recorded before the discriminator's."""

    def __init__(self, engine):
        layers = engine.module.discriminator.electra.encoder.layer
        layers[0].register_forward_pre_hook(self._enter)
        layers[-1].register_forward_hook(self._leave)
        self.seconds, self._forward_started, self._backward_started = 0.0, 0.0, 0.0
        backward = engine.backward

        def timed_backward(*args, **kwargs):
            self._backward_started = time.perf_counter()
            return backward(*args, **kwargs)

        engine.backward = timed_backward

    def _enter(self, module, inputs) -> None:
        self._forward_started = time.perf_counter()
        if inputs[0].requires_grad:
            inputs[0].register_hook(self._reached_first_layer)

    def _leave(self, module, inputs, output) -> None:
        self.seconds += time.perf_counter() - self._forward_started

    def _reached_first_layer(self, gradient) -> None:
        self.seconds += time.perf_counter() - self._backward_started

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def layer_training_flops(output, config) -> int:
    """The FLOP counter's forward + backward FLOPs of the discriminator's layers and heads."""
    from dsexit.model.flops import discriminator_layer_backward_flops, discriminator_layer_flops

    return sum(
        discriminator_layer_flops(work, config) + discriminator_layer_backward_flops(work, config)
        for work in output.compute_log.discriminator
    )


def build_arm(arm: Arm, args, ds_config: dict, device) -> None:
    from dsexit.model import ElectraExitConfig, exit_controller_for
    from dsexit.train.engine import build_engine, build_model
    from dsexit.train.step_runner import DataParallelSteps

    config = ElectraExitConfig.from_preset(
        args.preset, exit_enabled=arm.target is not None, exit_routing=arm.routing, **arm.overrides
    )
    engine = build_engine(build_model(config, seed=0), ds_config)
    data = batches(config, args.batch, args.seq_len, device)
    before_forward = None
    if args.compile:
        from dsexit.train.compiling import CompiledForward

        compiled = CompiledForward(engine, device, capacity_routing=arm.routing != "threshold")
        before_forward = compiled.before_forward
    arm.runner = DataParallelSteps(engine, data, args.accumulation, device, lambda: 1e-4, before_forward)
    target = arm.target if arm.target is not None and arm.target < 1.0 else None
    # No floor: untrained heads are steered to the target compute.
    arm.controller = exit_controller_for(
        config, target_compute=target, controller_gain=args.gain, capacity_interval=args.capacity_interval
    )
    arm.config = config
    arm.clock = LayerClock(engine) if device.type == "cpu" and not args.compile else None


def _recording(add, outputs: list):
    """`StepStats.add` that also keeps each micro-batch's output (its FLOP report)."""

    def recorded(output, batch):
        outputs.append(output)
        add(output, batch)

    return recorded


def capacity_level(arm: Arm, fixed: bool) -> int | None:
    """The capacity level of a capacity or random arm's next step: full depth at target 1.0; with `fixed`,
    the target's own level (level k plans about k/16 of the full depth); else the controller's."""
    from dsexit.model.capacity import LEVELS

    if arm.routing == "threshold" or arm.target is None:
        return None
    if arm.target == 1.0:
        return LEVELS
    return max(1, round(arm.target * LEVELS)) if fixed else arm.controller.capacity(arm.step)


def run_steps(arm: Arm, count: int, timed: bool, fixed_capacity: bool = False) -> None:
    from dsexit.train.step_stats import StepStats

    for _ in range(count):
        threshold = arm.controller.threshold(arm.step) if arm.target not in (None, 1.0) else None
        capacity = capacity_level(arm, fixed_capacity)
        stats = StepStats(arm.config.num_hidden_layers)
        outputs = []
        stats.add = _recording(stats.add, outputs)
        if arm.clock is not None:
            arm.clock.take()
        started = time.perf_counter()
        arm.runner.run(threshold, None, stats, exit_capacity=capacity)
        summary = stats.reduce(preempted=False, time_limit=False, device=arm.runner.device)
        elapsed = time.perf_counter() - started  # the reduction reads the device: the step has finished
        layer_seconds = arm.clock.take() if arm.clock is not None else float("nan")
        arm.controller.update(summary.compute_fraction, arm.step, floor_counts=summary.floor_counts)
        arm.step += 1
        if timed:
            arm.seconds.append(elapsed)
            arm.flops.append(sum(output.flops.training_flops for output in outputs))
            arm.compute.append(summary.compute_fraction)
            arm.layer_seconds.append(layer_seconds)
            arm.layer_flops.append(sum(layer_training_flops(output, arm.config) for output in outputs))


def arm_name(variant: str, target: float, routing: str) -> str:
    return f"{variant}@{target:.2f}" + ("" if routing == "threshold" else f":{routing}")


def arm_named(name: str) -> Arm:
    """ "plain" or "VARIANT@TARGET", or "VARIANT@TARGET:ROUTING" for another routing than threshold."""
    if name == "plain":
        return Arm("plain", {}, None)
    variant, target_and_routing = name.split("@")
    target, _, routing = target_and_routing.partition(":")
    return Arm(name, VARIANTS[variant], float(target), routing or "threshold")


def run_worker(args) -> None:
    """One arm in this process: settle, time `--steps` steps, write what was measured."""
    from dsexit.host_allocator import allocator_in_use
    from dsexit.train.cluster.distributed import init_process_group, setup_process

    # as the trainer starts: eager on a CPU with the CPU kernels; compiled with torch's own
    world, _ = setup_process(cpu_kernels=not args.compile)
    init_process_group(world)
    name, result_file = args.worker
    arm = arm_named(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    build_arm(arm, args, resolved_ds_config(args), device)
    run_steps(arm, args.settle, timed=False, fixed_capacity=args.fixed_capacity)
    run_steps(arm, args.steps, timed=True, fixed_capacity=args.fixed_capacity)
    record = {name: getattr(arm, name) for name in PER_STEP}
    record.update(
        settled=arm.controller.last_compute_fraction,
        threads=torch.get_num_threads(),
        host_allocator=allocator_in_use(),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux counts KiB
    )
    Path(result_file).write_text(json.dumps(record) + "\n")


def resolved_ds_config(args) -> dict:
    from dsexit.train.config import TrainConfig
    from dsexit.train.config.ds_config import find_ds_config, load_ds_config, resolve_ds_config

    train_config = TrainConfig.from_dict(
        {
            "training": {
                "global_batch_size": args.batch * args.accumulation,
                "micro_batch_size": args.batch,
                "precision": args.precision,
            }
        }
    )
    with tempfile.TemporaryDirectory() as monitor_dir:
        return resolve_ds_config(
            load_ds_config(find_ds_config(args.deepspeed)),
            train_config,
            dp_size=1,
            total_steps=10**6,
            monitor_dir=monitor_dir,
        )


def launch_arm(args, name: str, result_file: Path, precision: str) -> dict:
    """Run arm `name` in a process of its own (a fresh single-rank world) and read what it measured."""
    # This process's own world (if any) is not the worker's.
    env = {key: value for key, value in os.environ.items() if key not in _WORLD_VARS}
    command = [sys.executable, __file__, "--worker", name, str(result_file), "--precision", precision]
    for option in (
        "preset",
        "batch",
        "accumulation",
        "seq_len",
        "settle",
        "steps",
        "gain",
        "deepspeed",
        "capacity_interval",
    ):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += [flag for flag, on in (("--compile", args.compile), ("--fixed-capacity", args.fixed_capacity)) if on]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result_file.read_text())


_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    from dsexit.train.cluster.distributed import select_accelerator

    select_accelerator()
    precision = "bf16" if resolved_ds_config(args)["bf16"]["enabled"] else "fp32"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arms = [Arm("plain", {}, None)]
    for routing in args.routing:
        for variant in args.variants:
            arms += [
                Arm(arm_name(variant, target, routing), VARIANTS[variant], target, routing) for target in args.targets
            ]
    print(
        f"train_exit: {len(arms)} arms, {args.preset}, {shape(args.batch, args.accumulation, args.seq_len)}, "
        f"{precision}{', compiled' if args.compile else ''}; each arm "
        f"{args.launches} processes of {args.settle} settling and {args.steps} timed steps, taking turns",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory() as result_dir:
        for launch in range(args.launches):
            for arm in arms:
                record = launch_arm(args, arm.name, Path(result_dir, f"{arm.name}-{launch}.json"), precision)
                for name in PER_STEP:
                    getattr(arm, name).extend(record[name])
                arm.threads, arm.host_allocator = record["threads"], record["host_allocator"]
                arm.peak_rss_bytes = max(arm.peak_rss_bytes, record["peak_rss_bytes"])
                print(
                    f"  launch {launch + 1}/{args.launches} {arm.name}: settled at compute {record['settled']:.3f}, "
                    f"{statistics.median(record['seconds']):.3f} s/step",
                    file=sys.stderr,
                    flush=True,
                )
    from dsexit.eval.peak import matmul_peaks

    torch.set_num_threads(arms[0].threads)  # the workers' thread count
    peaks = matmul_peaks(device, args.peak_size)
    results = summarize(arms, args, precision, peaks, device.type)
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    for line in result_lines(results):
        print(line)
    return 0


def result_lines(results: dict) -> list[str]:
    """One RESULT line per routing and variant, each routing's best variant first."""
    precision = results["precision"]
    other = "fp32" if precision == "bf16" else "bf16"
    lines = []
    for routing, best in results["best_by_routing"].items():
        variants = sorted({row["variant"] for row in results["arms"].values() if row["routing"] == routing})
        for variant in [best, *(name for name in variants if name != best)]:
            row75 = results["arms"][arm_name(variant, 0.75, routing)]
            row50 = results["arms"][arm_name(variant, 0.5, routing)]
            measured = (
                f" measured_efficiency_at_75={row75['measured_efficiency']:.3f}"
                f" measured_efficiency_at_50={row50['measured_efficiency']:.3f}"
                if row75["measured_efficiency"] is not None
                else ""
            )
            lines.append(
                f"RESULT train_exit train_efficiency_at_75={row75['efficiency']:.3f} "
                f"train_efficiency_at_50={row50['efficiency']:.3f} train_speedup_at_75={row75['speedup']:.3f} "
                f"train_speedup_at_50={row50['speedup']:.3f} variant={variant} routing={routing} "
                f"exit_kv={VARIANTS[variant].get('exit_kv', 'keep')} compiled={'yes' if results['compiled'] else 'no'} "
                f"device={results['device'].replace(' ', '_')} peak_share_{precision}={results['peak_share']:.3f} "
                f"peak_share_{other}={results['peak_shares'][other]:.3f}{measured} "
                f"host_allocator={results['host_allocator']}"
            )
    return lines


def summarize(arms: list[Arm], args, precision: str, peaks: dict[str, float], device: str = "cpu") -> dict:
    """`peaks`: the matmul peak's FLOP/s per precision ("bf16", "fp32"), measured in the same run. The
    measured-ideal figures are None where the layer clock did not run (compiled, or on a GPU)."""
    from dsexit.eval.peak import device_name

    plain = arms[0]
    clocked = not any(math.isnan(seconds) for seconds in plain.layer_seconds)
    plain_seconds = statistics.median(plain.seconds)
    plain_flops = statistics.mean(plain.flops)
    plain_layer_seconds, plain_layer_flops = statistics.median(plain.layer_seconds), statistics.mean(plain.layer_flops)
    plain_rest_seconds = statistics.median(total - layer for total, layer in zip(plain.seconds, plain.layer_seconds))
    rows = {}
    for arm in arms:
        seconds, flops = statistics.median(arm.seconds), statistics.mean(arm.flops)
        layer_seconds, layer_flops = statistics.median(arm.layer_seconds), statistics.mean(arm.layer_flops)
        speedup, ideal = plain_seconds / seconds, plain_flops / flops
        # What the step would take if its layers cost their FLOP share of the plain arm's layers and the
        # rest (the same work in every arm) what it took in the plain arm.
        layers_at_plain_rate = plain_layer_seconds * layer_flops / plain_layer_flops
        measured_ideal = plain_seconds / (plain_rest_seconds + layers_at_plain_rate) if clocked else None
        rows[arm.name] = dict(
            variant=arm.name.split("@")[0] if arm.target is not None else None,
            target=arm.target,
            routing=arm.routing if arm.target is not None else None,
            seconds_per_step=seconds,
            compute_fraction=statistics.mean(arm.compute),
            training_flops=flops,
            speedup=speedup,
            ideal_speedup=ideal,
            efficiency=speedup / ideal,
            flops_per_s=flops / seconds,
            layer_seconds_per_step=layer_seconds if clocked else None,
            layer_training_flops=layer_flops,
            rest_seconds_per_step=(
                statistics.median(total - layer for total, layer in zip(arm.seconds, arm.layer_seconds))
                if clocked
                else None
            ),
            measured_ideal_speedup=measured_ideal,
            measured_efficiency=speedup / measured_ideal if clocked else None,
            layer_efficiency=layers_at_plain_rate / layer_seconds if clocked else None,
            peak_rss_bytes=arm.peak_rss_bytes,
            overrides=arm.overrides,
        )
    best_by_routing = {}
    for routing in dict.fromkeys(arm.routing for arm in arms if arm.target is not None):
        variants = sorted({name.split("@")[0] for name, row in rows.items() if row["routing"] == routing})
        best_by_routing[routing] = max(variants, key=lambda variant: rows[arm_name(variant, 0.75, routing)]["speedup"])
    return {
        "preset": args.preset,
        "batch": args.batch,
        "accumulation": args.accumulation,
        "seq_len": args.seq_len,
        "precision": precision,
        "threads": plain.threads,
        "host_allocator": ",".join(sorted({arm.host_allocator for arm in arms})),
        "matmul_peak_flops_per_s": peaks[precision],
        "peak_share": rows["plain"]["flops_per_s"] / peaks[precision],
        "matmul_peaks_flops_per_s": peaks,
        "peak_shares": {name: rows["plain"]["flops_per_s"] / peak for name, peak in peaks.items()},
        "device": device_name(device),
        "compiled": bool(getattr(args, "compile", False)),
        "layer_clock": clocked,
        "plain_layer_flops_per_s": plain_layer_flops / plain_layer_seconds if clocked else None,
        "plain_rest_flops_per_s": (plain_flops - plain_layer_flops) / plain_rest_seconds if clocked else None,
        "plain_layer_share_of_time": plain_layer_seconds / plain_seconds if clocked else None,
        "plain_layer_share_of_flops": plain_layer_flops / plain_flops,
        "arms": rows,
        "best_variant": next(iter(best_by_routing.values())),
        "best_by_routing": best_by_routing,
        "launches": args.launches,
        "timed_steps_per_launch": args.steps,
        "settle_steps": args.settle,
    }


def shape(batch: int, accumulation: int, seq_len: int) -> str:
    steps = f" x {accumulation} micro-batches per step" if accumulation > 1 else " per step"
    return f"batch {batch} x {seq_len}{steps}"


def print_table(results: dict) -> None:
    def figure(value, width: int) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    peaks_text = ", ".join(
        f"{name} {peak / 1e9:.0f}, plain at {results['peak_shares'][name]:.3f}"
        for name, peak in results["matmul_peaks_flops_per_s"].items()
    )
    print(
        f"\n{results['preset']}, {shape(results['batch'], results['accumulation'], results['seq_len'])}, "
        f"{results['precision']}{', compiled' if results['compiled'] else ''}, {results['device']}, "
        f"{results['threads']} threads, {results['host_allocator']}'s malloc; "
        f"matmul peak {results['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s; plain at {results['peak_share']:.3f} "
        f"of it (matmul peaks, GFLOP/s: {peaks_text})"
    )
    print(
        f"{'arm':<26}{'routing':>10}{'compute':>8}{'s/step':>8}{'layers s':>9}{'speedup':>8}{'ideal':>7}"
        f"{'efficiency':>11}{'measured ideal':>15}{'efficiency':>11}{'layers eff.':>12}"
    )
    for name, row in results["arms"].items():
        print(
            f"{name:<26}{row['routing'] or '-':>10}{row['compute_fraction']:>8.3f}{row['seconds_per_step']:>8.3f}"
            f"{figure(row['layer_seconds_per_step'], 9)}{row['speedup']:>8.3f}{row['ideal_speedup']:>7.3f}"
            f"{row['efficiency']:>11.3f}{figure(row['measured_ideal_speedup'], 15)}"
            f"{figure(row['measured_efficiency'], 11)}{figure(row['layer_efficiency'], 12)}"
        )
    print(
        "speedup and ideals are against the plain arm (no heads); compute = executed / full token-layers of "
        "exitable tokens (the controller's measure); ideal = training FLOPs (FLOP counter) plain / arm; "
        "layers = the discriminator's layers and heads, forward and backward"
    )
    if results["layer_clock"]:
        print(
            f"the FLOP ideal's assumption, measured in the plain arm: its layers ran at "
            f"{results['plain_layer_flops_per_s'] / 1e9:.0f} GFLOP/s ({results['plain_layer_share_of_flops']:.3f} of "
            f"the FLOPs, {results['plain_layer_share_of_time']:.3f} of the time), the rest at "
            f"{results['plain_rest_flops_per_s'] / 1e9:.0f} GFLOP/s"
        )
        plain_rest = results["arms"]["plain"]["rest_seconds_per_step"]
        exit_rests = [row["rest_seconds_per_step"] for name, row in results["arms"].items() if name != "plain"]
        print(
            f"the measured ideal's assumption, that the rest takes the plain arm's time in every arm: it took "
            f"{min(exit_rests):.3f}-{max(exit_rests):.3f} s per step in the exit arms, {plain_rest:.3f} in plain"
        )
    else:
        print("no layer clock (compiled, or on a GPU): the measured ideal is left out")
    memory = ", ".join(f"{name} {row['peak_rss_bytes'] / 2**30:.1f}" for name, row in results["arms"].items())
    print(f"peak resident memory of an arm's process, GiB: {memory}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
