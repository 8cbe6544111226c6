"""Pipeline stages that skip fully exited micro-batches: measured speedup against what the
measured stage costs allow, and a partition that balances expected work.

Two stages on two processes (gloo, CPU), electra-small. A fraction f (0, 25, 50, 75%) of the
micro-batches of every `train_batch` have all their tokens exit after layer `--exit-layer`
(forced; the others never exit). A stage whose micro-batch has no active token runs none of
its layers. Each fraction is timed round-robin; each figure is the median over repetitions.

Every stage's real costs are measured in the same run: each forward and backward pass (the
engine's own instructions, timed; sending and receiving are separate instructions and not
counted) and the optimizer step. The *attainable* time at fraction f is the critical path of
DeepSpeed's 1F1B schedule (`TrainSchedule`) with those measured per-micro-batch costs and no
communication; efficiency = measured speedup / attainable speedup (both against f = 0 on the
same partition).

Three partitions, launched alternately (`--launches` each) so machine noise hits them alike:
    default     the trainer's default (`type:DiscriminatorLayerPipe`: discriminator layers split
                evenly; stage 1 also holds the embeddings, the generator and the sampling)
    balanced    `--pipeline-partition expected:PROFILE` with nothing skipped: layer counts that
                balance the measured costs (the best pipeline without exits)
    skip-aware  the same at 50% skipped: later stages hold more layers, since they run them only
                for micro-batches with active tokens
The profiles come from the first default launch's measured costs and are written beside the
results (pipeline_profile_*.json; `dsexit/parallel/partition.py` reads them). `speedup_at_50` is
skip-aware at 50% skipped against balanced with nothing skipped; `speedup_at_50_same_partition`
against itself with nothing skipped; `efficiency_at_50` is skip-aware's measured speedup over its
attainable one. `work_bound_at_50` is the measured work per micro-batch, summed over the stages,
with nothing skipped over that at 50% skipped: no partition can beat the best unskipped pipeline
by more (perfect balance, no fill or drain).

    python bench/pipeline_skip.py [--repeats 3] [--micro-batches 8] [--micro-batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRACTIONS = (0.0, 0.25, 0.50, 0.75)
DEFAULT_PARTITION = "type:DiscriminatorLayerPipe"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--exit-layer", type=int, default=4, help="skipped micro-batches exit after this layer")
    parser.add_argument("--launches", type=int, default=2, help="launches per partition, alternating")
    parser.add_argument("--out", default="bench/results/pipeline_skip.json")
    parser.add_argument("--worker", metavar="RESULT_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--partition", default=DEFAULT_PARTITION, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- worker (one stage)
def skipped_micro_batches(fraction: float, micro_batches: int) -> set[int]:
    count = round(fraction * micro_batches)
    return {int(index * micro_batches / count) for index in range(count)} if count else set()


def run_worker(args) -> None:
    import deepspeed
    import torch
    from deepspeed.runtime.pipe import schedule

    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
    from dsexit.parallel.pipeline import (
        DiscriminatorLayerPipe,
        EmbedAndCorrupt,
        build_pipeline_module,
        micro_batch_inputs,
    )
    from dsexit.train.cluster.distributed import init_process_group, setup_process

    world, _ = setup_process()  # as the eager trainer starts: the CPU tuning and kernels (docs/cpu.md)
    init_process_group(world)
    rank = world.rank
    config = ElectraExitConfig.from_preset(args.preset, min_exit_layer=1)
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config)
    module = build_pipeline_module(config, num_stages=2, model=model, partition_method=args.partition)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "fused": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=module, config=ds_config, model_parameters=[p for p in module.parameters()]
    )

    # Time the engine's compute instructions (and each local layer's forward) as they run.
    passes: list[tuple[str, float]] = []
    timed_map = dict(type(engine)._INSTRUCTION_MAP)
    for command, kind in ((schedule.ForwardPass, "F"), (schedule.BackwardPass, "B"), (schedule.OptimizerStep, "O")):

        def timed(self, _original=timed_map[command], _kind=kind, **kwargs):
            started = time.perf_counter()
            _original(self, **kwargs)
            passes.append((_kind, time.perf_counter() - started))

        timed_map[command] = timed
    engine._INSTRUCTION_MAP = timed_map
    layer_seconds: dict[str, list[float]] = {}
    for layer in module.forward_funcs:
        if isinstance(layer, (DiscriminatorLayerPipe, EmbedAndCorrupt)):
            name = f"layer{layer.layer_number}" if isinstance(layer, DiscriminatorLayerPipe) else "embed"

            def hook_pre(_module, _inputs, _name=name):
                _module._started = time.perf_counter()

            def hook_post(_module, _inputs, _output, _name=name):
                layer_seconds.setdefault(_name, []).append(time.perf_counter() - _module._started)

            layer.register_forward_pre_hook(hook_pre)
            layer.register_forward_hook(hook_post)

    generator = torch.Generator().manual_seed(1)
    shape = (args.micro_batch_size, args.seq_len)
    inputs = []
    for _ in range(args.micro_batches):
        input_ids = torch.randint(1000, config.vocab_size, shape, generator=generator)
        input_ids[:, 0] = config.cls_token_id
        inputs.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "token_type_ids": torch.zeros_like(input_ids),
            }
        )
    never = torch.full(shape, config.num_hidden_layers + 1, dtype=torch.long)
    leave = torch.full(shape, args.exit_layer, dtype=torch.long)

    def micro_batches(fraction: float):
        skipped = skipped_micro_batches(fraction, args.micro_batches)
        return iter(
            [
                micro_batch_inputs(batch, config, None, None, leave if index in skipped else never)
                for index, batch in enumerate(inputs)
            ]
        )

    for fraction in FRACTIONS:  # warm-up
        engine.train_batch(micro_batches(fraction))
    seconds = {fraction: [] for fraction in FRACTIONS}
    costs = {fraction: {"F": [], "B": [], "O": []} for fraction in FRACTIONS}
    layer_means = {}
    for repeat in range(args.repeats):
        for fraction in FRACTIONS:
            passes.clear()
            layer_seconds.clear()
            torch.distributed.barrier()
            start = time.perf_counter()
            engine.train_batch(micro_batches(fraction))
            seconds[fraction].append(time.perf_counter() - start)
            for kind in "FBO":
                costs[fraction][kind].append([duration for k, duration in passes if k == kind])
            if fraction == 0.0:
                for name, values in layer_seconds.items():
                    layer_means.setdefault(name, []).append(statistics.mean(values))
        if rank == 0:
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    per_pass = {
        str(f): {kind: [statistics.median(column) for column in zip(*costs[f][kind])] for kind in "FBO"}
        for f in FRACTIONS
    }
    local_layers = sorted(int(name[5:]) for name in layer_means if name.startswith("layer"))
    Path(args.worker, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "stage": engine.stage_id,
                "parts": list(map(int, module.parts)),
                "layers": local_layers,
                "seconds": {str(k): v for k, v in seconds.items()},
                "pass_seconds": per_pass,
                "layer_forward_seconds": {name: statistics.median(values) for name, values in layer_means.items()},
            }
        )
    )


# ---------------------------------------------------------------------------- parent
def stage_op_order(micro_batches: int, stages: int) -> list[list[tuple[str, int]]]:
    """Per stage, DeepSpeed's 1F1B order of forward/backward passes as (kind, micro-batch)."""
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    orders = []
    for stage in range(stages):
        counts = {"F": 0, "B": 0}
        order = []
        for commands in TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage).steps():
            for command in commands:
                if isinstance(command, (ForwardPass, BackwardPass)):
                    kind = "F" if isinstance(command, ForwardPass) else "B"
                    order.append((kind, counts[kind]))
                    counts[kind] += 1
        orders.append(order)
    return orders


def attainable_time(pass_seconds: list[dict[str, list[float]]]) -> float:
    """Critical path of the 2-stage 1F1B schedule with the measured pass costs, no communication,
    then the slower stage's optimizer step."""
    micro_batches = len(pass_seconds[0]["F"])
    orders = stage_op_order(micro_batches, 2)
    done: dict[tuple[int, str, int], float] = {}
    position, clock = [0, 0], [0.0, 0.0]
    while any(position[stage] < len(orders[stage]) for stage in range(2)):
        progressed = False
        for stage in range(2):
            if position[stage] == len(orders[stage]):
                continue
            kind, index = orders[stage][position[stage]]
            needs = (
                [(stage - 1, "F", index)]
                if kind == "F" and stage > 0
                else [(stage, "F", index)] + ([(stage + 1, "B", index)] if stage < 1 else [])
                if kind == "B"
                else []
            )
            if any(need not in done for need in needs):
                continue
            start = max([clock[stage]] + [done[need] for need in needs])
            clock[stage] = start + pass_seconds[stage][kind][index]
            done[(stage, kind, index)] = clock[stage]
            position[stage] += 1
            progressed = True
        assert progressed, "schedule deadlocked"
    # The optimizer step ends in a collective, so a stage that finished its backward first waits there
    # for the other: the smallest measured step is the nearest to the step's own compute.
    return max(clock) + min(sum(stage["O"]) for stage in pass_seconds)


def launch_workers(args, partition: str, result_dir: Path) -> list[dict]:
    result_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        __file__,
        "--worker",
        str(result_dir),
        "--repeats",
        str(args.repeats),
        "--micro-batches",
        str(args.micro_batches),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--seq-len",
        str(args.seq_len),
        "--preset",
        args.preset,
        "--exit-layer",
        str(args.exit_layer),
        "--partition",
        partition,
    ]
    print(f"launching 2 stages, partition {partition}", file=sys.stderr, flush=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    workers = [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return sorted(workers, key=lambda worker: worker["stage"])


def measured_profile(workers: list[dict], num_layers: int, exit_layer: int, fraction: float) -> dict:
    """Per-micro-batch costs for `expected_work_partition`: each layer's forward+backward (its measured
    forward, scaled by its stage's backward/forward ratio), stage 1's cost before layer 1 (embeddings,
    generator, sampling and the optimizer step's share), and the scenario's reach."""
    layer_cost, first_stage_cost = [0.0] * num_layers, 0.0
    for worker in workers:
        passes = worker["pass_seconds"]["0.0"]
        forward, backward = statistics.mean(passes["F"]), statistics.mean(passes["B"])
        ratio = (forward + backward) / forward
        step_share = min(sum(stage["pass_seconds"]["0.0"]["O"]) for stage in workers) / len(passes["F"])
        timed = worker["layer_forward_seconds"]
        for number in worker["layers"]:
            layer_cost[number - 1] = timed[f"layer{number}"] * ratio
        if worker["stage"] == 0:
            first_stage_cost = forward + backward + step_share - sum(layer_cost[n - 1] for n in worker["layers"])
    reach = [1.0 if number <= exit_layer else 1.0 - fraction for number in range(1, num_layers + 1)]
    return {
        "first_stage_cost": first_stage_cost,
        "layer_cost": layer_cost,
        "reach": reach,
        "scenario": f"{fraction:.0%} of micro-batches exit entirely after layer {exit_layer}",
    }


def summarize(name: str, workers: list[dict], baseline_seconds: float) -> dict:
    """Per fraction: measured, attainable and efficiency on this partition; and against `baseline_seconds`."""
    medians = {
        fraction: statistics.median(
            max(a, b) for a, b in zip(workers[0]["seconds"][str(fraction)], workers[1]["seconds"][str(fraction)])
        )
        for fraction in FRACTIONS
    }
    attainable = {
        fraction: attainable_time([worker["pass_seconds"][str(fraction)] for worker in workers])
        for fraction in FRACTIONS
    }
    rows = {}
    for fraction in FRACTIONS:
        measured = medians[0.0] / medians[fraction]
        ideal = attainable[0.0] / attainable[fraction]
        stage_costs = [
            sum(worker["pass_seconds"][str(fraction)]["F"]) + sum(worker["pass_seconds"][str(fraction)]["B"])
            for worker in workers
        ]
        rows[str(fraction)] = {
            "seconds_per_train_batch": medians[fraction],
            "speedup": measured,
            "attainable_seconds": attainable[fraction],
            "attainable_speedup": ideal,
            "efficiency": measured / ideal,
            "speedup_vs_default_unskipped": baseline_seconds / medians[fraction],
            "stage_compute_seconds": stage_costs,
        }
    return {"partition": name, "layers_per_stage": [len(worker["layers"]) for worker in workers], "fractions": rows}


def pooled(launches: list[list[dict]]) -> list[dict]:
    """One worker record per stage from several launches: timings pooled, pass costs medians."""
    stages = []
    for stage_records in zip(*launches):
        merged = dict(stage_records[0])
        merged["seconds"] = {
            key: [value for record in stage_records for value in record["seconds"][key]]
            for key in stage_records[0]["seconds"]
        }
        merged["pass_seconds"] = {
            key: {
                kind: [
                    statistics.median(values)
                    for values in zip(*(record["pass_seconds"][key][kind] for record in stage_records))
                ]
                for kind in "FBO"
            }
            for key in stage_records[0]["pass_seconds"]
        }
        merged["layer_forward_seconds"] = {
            name: statistics.median(record["layer_forward_seconds"][name] for record in stage_records)
            for name in stage_records[0]["layer_forward_seconds"]
        }
        stages.append(merged)
    return stages


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    from dsexit.model import ElectraExitConfig
    from dsexit.parallel.partition import stage_expected_costs

    num_layers = ElectraExitConfig.from_preset(args.preset).num_hidden_layers
    result_dir = Path(args.out).with_suffix(".workers")
    # 1. the default partition, measured: the stage costs that feed the other two
    first = launch_workers(args, DEFAULT_PARTITION, result_dir / "default-0")
    profiles, partitions = {}, {"default": DEFAULT_PARTITION}
    for key, fraction in (("balanced", 0.0), ("skip-aware", 0.5)):
        profiles[key] = measured_profile(first, num_layers, args.exit_layer, fraction)
        path = Path(args.out).with_name(f"pipeline_profile_{key}.json")
        path.write_text(json.dumps(profiles[key], indent=1) + "\n")
        partitions[key] = f"expected:{path}"
    # 2. all three, alternating, so that machine noise hits them alike
    launches = {"default": [first], "balanced": [], "skip-aware": []}
    for launch in range(args.launches):
        for key in ("balanced", "skip-aware", "default"):
            if key == "default" and launch == 0:
                continue
            launches[key].append(launch_workers(args, partitions[key], result_dir / f"{key}-{launch}"))
    workers = {key: pooled(records) for key, records in launches.items()}
    balanced_unskipped = statistics.median(
        max(a, b) for a, b in zip(workers["balanced"][0]["seconds"]["0.0"], workers["balanced"][1]["seconds"]["0.0"])
    )
    skip_profile = profiles["skip-aware"]
    results = {
        "preset": args.preset,
        "micro_batches": args.micro_batches,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "exit_layer": args.exit_layer,
        "launches": args.launches,
        "profile": skip_profile,
        "partitions": {},
    }
    for key, stages in workers.items():
        counts = [len(stage["layers"]) for stage in stages]
        summary = summarize(key, stages, balanced_unskipped)
        summary["expected_stage_costs_at_50"] = stage_expected_costs(
            counts, skip_profile["first_stage_cost"], skip_profile["layer_cost"], skip_profile["reach"]
        )
        results["partitions"][key] = summary
    print(
        f"\nper micro-batch (forward + backward, s): before layer 1 {skip_profile['first_stage_cost']:.3f}, "
        f"layers {statistics.mean(skip_profile['layer_cost']):.3f} each on average; skipped micro-batches exit "
        f"after layer {args.exit_layer}"
    )
    print(
        f"{'partition':<20}{'skipped':>8}{'s/batch':>9}{'speedup':>9}{'attainable':>11}{'efficiency':>11}"
        f"{'vs balanced@0':>14}"
    )
    for key, partition in results["partitions"].items():
        label = f"{key} {'/'.join(map(str, partition['layers_per_stage']))}"
        for fraction, row in partition["fractions"].items():
            print(
                f"{label:<20}{float(fraction):>8.0%}{row['seconds_per_train_batch']:>9.2f}{row['speedup']:>9.2f}"
                f"{row['attainable_speedup']:>11.2f}{row['efficiency']:>11.3f}"
                f"{row['speedup_vs_default_unskipped']:>14.2f}"
            )
    print(
        "speedup, attainable: against the same partition with nothing skipped (attainable = 1F1B critical path of "
        "the measured pass costs, no communication); vs balanced@0 = against the partition that balances measured "
        "costs with nothing skipped (the best pipeline without exits)"
    )
    # No partition can beat the best unskipped pipeline by more than the step's own work ratio
    # (perfectly balanced stages, no pipeline fill or drain).
    work = sum(skip_profile["layer_cost"]) + skip_profile["first_stage_cost"]
    work_at_50 = sum(c * r for c, r in zip(skip_profile["layer_cost"], skip_profile["reach"]))
    results["work_bound_at_50"] = work / (work_at_50 + skip_profile["first_stage_cost"])
    print(
        f"work bound at 50% skipped: {results['work_bound_at_50']:.2f}x (all stages' measured work per micro-batch, "
        f"nothing skipped over 50% skipped: the most any partition can gain over the best unskipped pipeline)"
    )
    at_50 = {key: partition["fractions"]["0.5"] for key, partition in results["partitions"].items()}
    results.update(
        efficiency_at_50=at_50["skip-aware"]["efficiency"],
        efficiency_at_50_default=at_50["default"]["efficiency"],
        speedup_at_50=at_50["skip-aware"]["speedup_vs_default_unskipped"],
        speedup_at_50_default=at_50["default"]["speedup_vs_default_unskipped"],
    )
    results.update(peak_share(args, results["partitions"]["balanced"]["fractions"]["0.0"]["seconds_per_train_batch"]))
    print(
        f"balanced, nothing skipped: {results['model_flops_per_s'] / 1e9:.1f} GFLOP/s of model work (FLOP counter, "
        f"2 processes) = {results['peak_share_fp32']:.3f} of two cores' fp32 matmul peak "
        f"({results['matmul_peak_fp32_per_core'] / 1e9:.1f} GFLOP/s per single-threaded core, measured now; "
        f"{results['peak_share_bf16']:.3f} of the bf16 peak, {results['matmul_peak_bf16_per_core'] / 1e9:.1f} per core)"
    )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    layout = "/".join(map(str, results["partitions"]["skip-aware"]["layers_per_stage"]))
    print(
        f"RESULT pipeline_skip efficiency_at_50={results['efficiency_at_50']:.3f} "
        f"speedup_at_50={results['speedup_at_50']:.3f} efficiency_at_50_default="
        f"{results['efficiency_at_50_default']:.3f} speedup_at_50_default={results['speedup_at_50_default']:.3f} "
        f"skip_aware_partition={layout} peak_share_fp32={results['peak_share_fp32']:.3f} "
        f"peak_share_bf16={results['peak_share_bf16']:.3f} "
        f"speedup_at_50_same_partition={results['partitions']['skip-aware']['fractions']['0.5']['speedup']:.3f} "
        f"work_bound_at_50={results['work_bound_at_50']:.3f}"
    )


def peak_share(args, seconds_per_train_batch: float) -> dict:
    """The model's FLOP/s (FLOP counter, full depth) over this machine's fp32 matmul peak (the precision the
    stages run in), and over its bf16 peak beside it; one thread per stage process as the workers run."""
    import torch

    from dsexit.eval.peak import matmul_peaks
    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel

    torch.set_num_threads(1)
    config = ElectraExitConfig.from_preset(args.preset, min_exit_layer=1)
    input_ids = torch.randint(1000, config.vocab_size, (args.micro_batch_size, args.seq_len))
    input_ids[:, 0] = config.cls_token_id
    with torch.no_grad():
        flops = ElectraPreTrainingModel(config)(input_ids).flops.training_flops
    model_flops_per_s = flops * args.micro_batches / seconds_per_train_batch
    shares = {"model_flops_per_s": model_flops_per_s}
    for name, per_core in matmul_peaks(torch.device("cpu"), 1024).items():
        shares[f"matmul_peak_{name}_per_core"] = per_core
        shares[f"peak_share_{name}"] = model_flops_per_s / (2 * per_core)
    return shares


if __name__ == "__main__":
    main()
