"""Pipeline stages that skip fully exited micro-batches: measured speedup against the ideal.

Two stages on two processes (gloo, CPU), electra-small, stages partitioned by parameter
count (DeepSpeed's default), so the second stage holds most discriminator layers and is
the bottleneck, as it is for the late stages of a deep pipeline. Exits are forced so that
0, 25, 50 and 75% of the micro-batches of every `train_batch` leave entirely on stage 1;
stage 2 then runs no layer for them. Fractions are timed round-robin; each figure is the
median over the repetitions.

The ideal comes from the FLOP counter: per micro-batch, stage 1 costs F1 and stage 2 costs
F2 (0 when skipped). The ideal time is the critical path of DeepSpeed's own 1F1B schedule
(`TrainSchedule`) with those costs and zero overhead (no communication, no gather); the
ideal speedup at fraction f is T(0) / T(f). A plain "busier stage's total" bound would
be wrong here: 1F1B keeps at most two micro-batches in flight, so stage 1 cannot run
ahead while stage 2 works through a full micro-batch.

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--out", default="bench/results/pipeline_skip.json")
    parser.add_argument("--worker", metavar="RESULT_DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- worker (one stage)
def skipped_micro_batches(fraction: float, micro_batches: int) -> set[int]:
    count = round(fraction * micro_batches)
    return {int(index * micro_batches / count) for index in range(count)} if count else set()


def run_worker(args) -> None:
    import deepspeed
    import torch

    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
    from dsexit.model.flops import discriminator_layer_flops, embedding_and_generator_flops
    from dsexit.parallel.pipeline import build_pipeline_module, micro_batch_inputs

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = ElectraExitConfig.from_preset(args.preset, min_exit_layer=1)
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config)
    module = build_pipeline_module(config, num_stages=2, model=model, partition_method="parameters")
    boundary = int(module.parts[1]) - 1  # last discriminator layer on stage 1 (pipe layer 0 is the embedding)
    ds_config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
                 "gradient_accumulation_steps": args.micro_batches,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config,
                                           model_parameters=[p for p in module.parameters()])
    counters = module.stage_counters

    generator = torch.Generator().manual_seed(1)
    shape = (args.micro_batch_size, args.seq_len)
    inputs = []
    for _ in range(args.micro_batches):
        input_ids = torch.randint(1000, config.vocab_size, shape, generator=generator)
        input_ids[:, 0] = config.cls_token_id
        inputs.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                       "token_type_ids": torch.zeros_like(input_ids)})
    never = torch.full(shape, config.num_hidden_layers + 1, dtype=torch.long)
    at_boundary = torch.full(shape, boundary, dtype=torch.long)

    def micro_batches(fraction: float):
        skipped = skipped_micro_batches(fraction, args.micro_batches)
        return iter([micro_batch_inputs(batch, config, None, None, at_boundary if index in skipped else never)
                     for index, batch in enumerate(inputs)])

    for fraction in FRACTIONS:  # warm-up, and check that the skips happen as planned
        counters.reset()
        engine.train_batch(micro_batches(fraction))
        if engine.stage_id == 1:
            assert counters.skipped_micro_batches == len(skipped_micro_batches(fraction, args.micro_batches))
    seconds = {fraction: [] for fraction in FRACTIONS}
    for repeat in range(args.repeats):
        for fraction in FRACTIONS:
            torch.distributed.barrier()
            start = time.perf_counter()
            engine.train_batch(micro_batches(fraction))
            seconds[fraction].append(time.perf_counter() - start)
        if rank == 0:
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    # Per-stage FLOPs of one micro-batch, from the same model run data-parallel style.
    with torch.no_grad():
        log = model(**inputs[0], exit_plan=never).compute_log
    stage_one = embedding_and_generator_flops(log, config) + sum(
        discriminator_layer_flops(work, config) for work in log.discriminator[:boundary])
    stage_two = sum(discriminator_layer_flops(work, config) for work in log.discriminator[boundary:])
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps({
        "stage": engine.stage_id, "boundary_layer": boundary, "seconds": {str(k): v for k, v in seconds.items()},
        "stage_flops": [stage_one, stage_two]}))


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


def ideal_time(fraction: float, micro_batches: int, stage_one: float, stage_two: float) -> float:
    """Critical path of the 1F1B schedule with zero overhead: forward = 1/3, backward = 2/3
    of a micro-batch's training FLOPs; a skipped micro-batch costs stage 2 nothing."""
    skipped = skipped_micro_batches(fraction, micro_batches)
    work = [[stage_one] * micro_batches, [0.0 if i in skipped else stage_two for i in range(micro_batches)]]
    orders = stage_op_order(micro_batches, 2)
    done: dict[tuple[int, str, int], float] = {}
    position, clock = [0, 0], [0.0, 0.0]
    while any(position[stage] < len(orders[stage]) for stage in range(2)):
        progressed = False
        for stage in range(2):
            if position[stage] == len(orders[stage]):
                continue
            kind, index = orders[stage][position[stage]]
            needs = ([(stage - 1, "F", index)] if kind == "F" and stage > 0 else
                     [(stage, "F", index)] + ([(stage + 1, "B", index)] if stage < 1 else []) if kind == "B" else [])
            if any(need not in done for need in needs):
                continue
            start = max([clock[stage]] + [done[need] for need in needs])
            clock[stage] = start + work[stage][index] * (1 / 3 if kind == "F" else 2 / 3)
            done[(stage, kind, index)] = clock[stage]
            position[stage] += 1
            progressed = True
        assert progressed, "schedule deadlocked"
    return max(clock)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    result_dir = Path(args.out).with_suffix(".workers")
    result_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               __file__, "--worker", str(result_dir), "--repeats", str(args.repeats),
               "--micro-batches", str(args.micro_batches), "--micro-batch-size", str(args.micro_batch_size),
               "--seq-len", str(args.seq_len), "--preset", args.preset]
    print(f"launching 2 stages: {' '.join(command[2:])}", file=sys.stderr)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    workers = [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    stage_one, stage_two = workers[0]["stage_flops"]
    rows, results = [], {"preset": args.preset, "micro_batches": args.micro_batches,
                         "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
                         "boundary_layer": workers[0]["boundary_layer"],
                         "stage_forward_flops": [stage_one, stage_two], "fractions": {}}
    # train_batch ends together on both stages; take the later finisher per repetition.
    medians = {fraction: statistics.median(max(a, b) for a, b in zip(workers[0]["seconds"][str(fraction)],
                                                                      workers[1]["seconds"][str(fraction)]))
               for fraction in FRACTIONS}
    for fraction in FRACTIONS:
        measured = medians[0.0] / medians[fraction]
        ideal = (ideal_time(0.0, args.micro_batches, stage_one, stage_two)
                 / ideal_time(fraction, args.micro_batches, stage_one, stage_two))
        rows.append((fraction, medians[fraction], measured, ideal, measured / ideal))
        results["fractions"][str(fraction)] = {"seconds_per_train_batch": medians[fraction],
                                               "speedup": measured, "ideal_speedup": ideal,
                                               "efficiency": measured / ideal}
    print(f"\nstage 1: embeddings, generator, layers 1-{results['boundary_layer']}; stage 2: the rest "
          f"(forward GFLOP per micro-batch {stage_one / 1e9:.1f} / {stage_two / 1e9:.1f})")
    print(f"{'skipped micro-batches':<24}{'s/train_batch':>14}{'speedup':>9}{'ideal':>7}{'measured/ideal':>16}")
    for fraction, seconds, measured, ideal, efficiency in rows:
        print(f"{fraction:<24.0%}{seconds:>14.2f}{measured:>9.2f}{ideal:>7.2f}{efficiency:>16.2f}")
    efficiency_at_50 = results["fractions"]["0.5"]["efficiency"]
    results["efficiency_at_50"] = efficiency_at_50
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(f"RESULT pipeline_skip efficiency_at_50={efficiency_at_50:.3f}")


if __name__ == "__main__":
    main()
