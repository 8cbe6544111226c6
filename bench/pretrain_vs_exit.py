"""Does early exit keep held-out quality for less pre-training wall clock?

Arms pre-train for the same wall clock through the real trainer (`launch/pretrain.py`, one
process each, `--max-minutes`, learning-rate schedule over the budget), with several
pre-training seeds per arm:

    baseline        no exit
    exit-0.75       early exit, controller target_compute 0.75, exit_criterion prior_margin
    exit-0.50       early exit, target 0.5, prior_margin
    exit-0.50-conf  early exit, target 0.5, exit_criterion confidence (|2p-1|, the earlier rule)
    exit-0.50-nofloor   exit-0.50 with no floor under tau (`--min-confidence 0`; the others keep the default)
    exit-0.75-linear, exit-0.50-linear   the same with linear exit heads (`--exit-head linear`, H->1)
    exit-0.75-linear-drop, exit-0.50-linear-drop   linear heads, and exited tokens leave later
                    layers' keys and values (`--exit-kv drop`); -k2-drop: heads every 2nd layer too
    capacity-0.75, capacity-0.50   capacity routing (`--exit-routing capacity`): a fixed number of
                    rows per sequence continue after each head, the least confident; the level
                    steered toward the target (the exit-* arms route by threshold)
    random-0.75, random-0.50   the same capacities, the continuing rows drawn at random (DeepSpeed
                    random-LTD's rule): whether the heads' confidence beats chance
    generator-free  no exit, uniform replacements (only where the other arms use an MLM generator)

Quality is the trainer's held-out evaluation (`dsexit.train.heldout`): RTD loss on validation
samples the run never trained on, under fixed uniform corruption (independent of each arm's
generator), at full depth, against training minutes (held-out evaluation time excluded).

Arms are paired by seed. Every arm of a seed runs the same trainer command but for its exit flags
(and `--generator` for generator-free), with the same `--seed`, which fixes the initial weights
(exit heads are drawn after every other module, so the shared weights are equal bit for bit), the
data order (`StreamingShardReader`, from the seed alone) and the random stream of masks,
replacements and dropout (with the CPU kernels the trainer uses on a CPU host, a dropout call takes
one draw whatever the number of active tokens, so an arm whose tokens exit stays on the no-exit
run's stream; torch's own dropout, on a GPU or with --compile, parts the streams once exits start).
For each arm and seed, against the baseline of the same seed:

    delta at matched step      held-out loss difference at the largest step both runs reached
    delta at matched minutes   the same at the largest training minute both reached
    time saved                 1 - t_arm / t_baseline, t = training minutes until the run's held-out
                               curve, fitted non-increasing (isotonic), first reaches the baseline's
                               final fitted loss; interpolated between evaluations; an arm that never
                               gets there is extrapolated from its last third (twice the budget if flat)

Each is reported as its mean over seeds with a 95% Student-t interval (`dsexit.eval.paired`; none
below 5 seeds: with 2 or 3 the interval says nothing), and is resolved where the interval excludes
zero. Time to target is ill-conditioned where the curves flatten (a small loss difference moves the
crossing a long way), which is why the losses at matched budgets stand beside it. The best arm is
chosen among arms whose exits ran (compute after exit warmup below 0.98); the table marks runs whose
exits never started (the budget ended inside the exit warmup: a fresh run refuses the comparison
then, see below; `--report` on older results shows it) or let almost no token out.

Precondition, printed as its own line: the baseline's first seed against an untrained model of
the same shape, downstream (`dsexit.eval`: ELECTRA fine-tuning recipe and a frozen-feature linear
probe, median of 5 seeds each). Where pre-training does not beat the untrained model downstream,
the downstream comparison of arms is not resolvable at this scale and the held-out metric is
the one that measures the claim.

Routing study (`--scale routing`): threshold, capacity and random routing at target compute 0.75 and
0.5, with the baseline, every run ending at the same step (`--steps`, not a minute budget, so the
comparison at equal compute is at exactly matched steps whatever else loads the machine; speed is
train_exit's measure). Besides the table against the baseline it pairs routing against routing at each
target (capacity - threshold, random - threshold, random - capacity): the held-out RTD loss at full
depth and under each run's own exit rule, and the compute, each with its t-interval from 3 seeds (the
MLM recipe's study runs three; at 2 degrees of freedom the interval is wide, but it is one). One
RESULT routing_quality line per target, before the RESULT pretrain_vs_exit line.

    python bench/pretrain_vs_exit.py --scale routing --no-precondition    # 7 arms x 5 seeds, 400 steps
    python bench/pretrain_vs_exit.py --scale routing --no-precondition --generator mlm \
        --generator-temperature 2 --seeds 3 --steps 500    # the MLM recipe
    python bench/pretrain_vs_exit.py --scale quick    # 2-core CPU, generator-free arms, ~75 min
    python bench/pretrain_vs_exit.py --scale quick-paired --no-precondition   # 5 seeds x 3 arms, 4 min each
    python bench/pretrain_vs_exit.py --scale device   # one H200-class GPU, ELECTRA-Small, < 6 min
    python bench/pretrain_vs_exit.py --scale device --dry-run   # the device path on a CPU, tiny

An exit arm measures exits only if they were on for most of its run: every exit arm must spend
at least two thirds of its steps past its exit warm-up (counted from its metrics.jsonl). Where
one does not, the benchmark prints which run fell short and publishes no comparison (no table,
no RESULT line; exit status 3).

The last line is

    RESULT pretrain_vs_exit time_saved_pct=X ci_low=X ci_high=X heldout_rtd_delta=X seeds=N resolved=yes|no
        best_arm=NAME   (one line)

with the best arm's mean time saved (%) and its interval, its delta at matched minutes, the number of
paired seeds, and whether the time saved is resolved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dsexit.eval.paired import MIN_SEEDS_FOR_INTERVAL, isotonic_non_increasing, t_interval, value_at
from dsexit.train.cluster.distributed import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"


@dataclass
class Arm:
    name: str
    flags: list[str]
    early_exit: bool


ARMS = [
    Arm("baseline", ["--no-exit"], False),
    Arm("exit-0.75", ["--exit", "--target-compute", "0.75", "--exit-criterion", "prior_margin"], True),
    Arm("exit-0.50", ["--exit", "--target-compute", "0.5", "--exit-criterion", "prior_margin"], True),
    Arm("exit-0.50-conf", ["--exit", "--target-compute", "0.5", "--exit-criterion", "confidence"], True),
    Arm("generator-free", ["--no-exit", "--generator", "uniform"], False),
    # The controller's floor under tau (`--min-confidence`) switched off: the exit arms above run with
    # the trainer's default floor.
    Arm(
        "exit-0.50-nofloor",
        ["--exit", "--target-compute", "0.5", "--exit-criterion", "prior_margin", "--min-confidence", "0"],
        True,
    ),
    Arm(
        "exit-0.75-linear",
        ["--exit", "--target-compute", "0.75", "--exit-criterion", "prior_margin", "--exit-head", "linear"],
        True,
    ),
    Arm(
        "exit-0.50-linear",
        ["--exit", "--target-compute", "0.5", "--exit-criterion", "prior_margin", "--exit-head", "linear"],
        True,
    ),
    *(
        Arm(
            f"{routing}-{target}",
            ["--exit", "--target-compute", target, "--exit-criterion", "prior_margin", "--exit-routing", routing],
            True,
        )
        for routing in ("capacity", "random")
        for target in ("0.75", "0.50")
    ),
    *(
        Arm(
            f"exit-{target}-linear{'-k2' if interval == 2 else ''}-drop",
            ["--exit", "--target-compute", target, "--exit-criterion", "prior_margin", "--exit-head", "linear"]
            + ["--exit-interval", str(interval), "--exit-kv", "drop"],
            True,
        )
        for target in ("0.75", "0.50")
        for interval in (1, 2)
    ),
]

# A 6-layer, 128-wide discriminator (generator 32 wide, 2 layers): minutes on a CPU core, yet the
# discriminator is most of a step's FLOPs, as in ELECTRA-Small, so early exit can show in time.
QUICK_MODEL = dict(
    embedding_size=64,
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=2,
    intermediate_size=512,
    generator_hidden_size=32,
    generator_num_hidden_layers=2,
    generator_num_attention_heads=1,
    min_exit_layer=2,
    max_position_embeddings=128,
    head_bias_init="prior",
)

SCALES = {
    # 2-core CPU: an 8192-piece SentencePiece trained on the corpus, 64-token samples; two runs at
    # a time, one thread each; generator-free replacement for every arm (an MLM generator's
    # discriminator stays at the replaced-token prior for the whole budget here: bench/plateau.py).
    "quick": dict(
        tokenizer="train:8192",
        seq_len=64,
        corpus_files=None,
        model="electra-tiny",
        model_set=QUICK_MODEL,
        generator="uniform",
        lr=1e-3,
        global_batch=32,
        micro_batch=32,
        warmup_steps=100,
        exit_warmup_steps=100,
        eval_interval=100,
        eval_samples=256,
        minutes=7.0,
        concurrency=2,
        threads=1,
        seeds=2,
        arms=("baseline", "exit-0.75", "exit-0.50", "exit-0.50-conf"),
        finetune=dict(epochs=3, batch_size=32, max_seq_len=64, max_train_examples=2000),
        finetune_seeds=5,
        finetune_workers=2,
    ),
    # One H200-class GPU, whole comparison < 6 minutes: ELECTRA-Small shapes, BERT's WordPiece
    # vocabulary, 128-token samples from part of the shared corpus; arms one after another with an
    # MLM generator, plus the generator-free arm; full rt_sentiment fine-tuning.
    "device": dict(
        tokenizer="wordpiece",
        seq_len=128,
        corpus_files=("brown", "janeausten", "moby_dick", "sword_engWEB2015eb", "fortunes"),
        model="electra-small",
        model_set={},
        generator="mlm",
        lr=1e-3,
        global_batch=128,
        micro_batch=128,
        # The exit warm-up is a share of the steps the run is expected to take, so exits are on for
        # most of it (the first device run warmed up for 200 of its ~205 steps and measured nothing).
        # The exit arms ran ~250 steps a minute on an H200 (bench/results/pretrain_vs_exit_device.json:
        # 205-208 steps in 0.84 min): a warm-up of 0.2 x 0.8 x 250 = 40 steps leaves exits on for
        # 2/3 of the run as long as it takes at least 120 steps, 60% of the expected.
        warmup_steps=50,
        steps_per_minute=250,
        exit_warmup_share=0.2,
        eval_interval=50,
        eval_samples=1024,
        minutes=0.8,
        concurrency=1,
        threads=None,
        seeds=1,
        arms=("baseline", "exit-0.75", "exit-0.50", "generator-free"),
        finetune=dict(epochs=2, batch_size=32, max_seq_len=128, max_train_examples=None),
        finetune_seeds=3,
        finetune_workers=1,
    ),
}
# The quick scale's model, data and replacement, cut to 4 training minutes so that five seeds of the
# baseline and two exit arms fit in about 40 minutes, two runs at a time: differences paired by seed
# with an interval over five seeds, where the quick scale ran two long seeds per arm. Evaluations every
# 25 steps, so the shorter curves still have points to smooth and interpolate.
SCALES["quick-paired"] = {
    **SCALES["quick"],
    "minutes": 4.0,
    "seeds": 5,
    # A few hundred steps per run on a shared machine: learning-rate and exit warm-ups short enough
    # that exits are on for most of every run even where the machine is busy.
    "warmup_steps": 50,
    "exit_warmup_steps": 30,
    "eval_interval": 25,
    "arms": ("baseline", "exit-0.75", "exit-0.50"),  # exit-0.50-nofloor isolates the floor: --arms
    "data_cache": "quick",  # the same prepared dataset as the quick scale
    # All arms of a seed at once (one thread each), so the arms of a seed share the machine alike; with
    # two at a time runs paired up across seeds and the last one ran alone.
    "concurrency": 3,
}
# Issue 24's routing study: threshold, capacity and random routing at target compute 0.75 and 0.5 (and
# the baseline), the arms of a seed paired. Runs end at a fixed step, not a minute budget, so the
# quality at equal compute is compared at exactly matched steps whatever else loads the machine (the
# speed of the routings is train_exit's and exit_speed's measure). Two at a time, one thread each.
ROUTING_TARGETS = ("0.75", "0.50")
ROUTING_ARMS = {"threshold": "exit-{}", "capacity": "capacity-{}", "random": "random-{}"}
ROUTING_PAIRS = (("capacity", "threshold"), ("random", "threshold"), ("random", "capacity"))
SCALES["routing"] = {
    **SCALES["quick-paired"],
    "steps": 400,
    "concurrency": 2,
    "arms": ("baseline", *(arm.format(target) for target in ROUTING_TARGETS for arm in ROUTING_ARMS.values())),
}
DRY_RUN = dict(
    model_set=dict(max_position_embeddings=128),
    corpus_files=("moby_dick",),
    minutes=0.06,  # about 100 steps of electra-tiny on one CPU thread: the path, not a result
    global_batch=8,
    micro_batch=8,
    warmup_steps=5,
    exit_warmup_steps=5,
    exit_warmup_share=None,
    eval_interval=10,
    eval_samples=16,
    capacity_interval=2,
    threads=1,
    finetune=dict(epochs=1, batch_size=16, max_seq_len=32, max_train_examples=64, max_eval_examples=64),
    finetune_seeds=2,
    model="electra-tiny",
    tokenizer="train:1024",
    seq_len=32,
)


# ---------------------------------------------------------------------------------- data
def prepare_corpus(corpus: Path, files, cache: Path, tokenizer: str, seq_len: int) -> Path:
    """The dataset, prepared once into `cache` (with its held-out validation split)."""
    if (cache / "index.json").exists() and json.loads((cache / "index.json").read_text()).get("validation"):
        return cache
    inputs = [str(corpus / f"{name}.jsonl.gz") for name in files] if files else [str(corpus / "*.jsonl.gz")]
    print(f"preparing {len(inputs)} input(s) from {corpus} -> {cache} (once)", flush=True)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "prepare_data.py"),
            "--input",
            *inputs,
            "--out",
            str(cache),
            "--tokenizer",
            tokenizer,
            "--seq-len",
            str(seq_len),
            "--overwrite",
        ],
        check=True,
    )
    return cache


def tokenizer_spec(scale: dict, vocab: Path) -> str:
    return f"wordpiece:{vocab}" if scale["tokenizer"] == "wordpiece" else scale["tokenizer"]


# ---------------------------------------------------------------------------------- pre-training
@dataclass
class Run:
    arm: Arm
    seed: int
    run_dir: Path


def trainer_command(run: Run, scale: dict, data: Path, generator: str) -> list[str]:
    flags = list(run.arm.flags)
    if "--generator" not in flags:
        flags += ["--generator", generator]
    if run.arm.early_exit and "--exit-routing" not in flags:
        flags += ["--exit-routing", "threshold"]  # the exit-* arms, whatever the trainer's default
    return [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--preset",
        "smoke",
        "--model",
        scale["model"],
        "--data",
        str(data),
        "--run-dir",
        str(run.run_dir),
        "--seed",
        str(run.seed),
        *run_budget(scale),
        "--warmup-steps",
        str(scale["warmup_steps"]),
        "--exit-warmup-steps",
        str(exit_warmup_steps(scale)),
        "--save-interval",
        "1000000",
        "--keep-last",
        "1",
        "--eval-interval",
        str(scale["eval_interval"]),
        "--eval-samples",
        str(scale["eval_samples"]),
        "--capacity-interval",  # capacity and random arms: steps between changes of the level
        str(scale.get("capacity_interval", 20)),
        "--log-interval",
        # no rarer than the evaluations: a short run (a dry run on a busy machine) still writes the
        # training records its exit count is read from
        str(min(50, scale["eval_interval"])),
        "--no-export-hf",
        "--no-tensorboard",
        "--no-csv",
        "--progress",
        "lines",
        "--resume",
        "none",
        "--start-over",  # a rerun moves the arm's previous run aside (nothing is deleted)
        "--lr",
        str(scale["lr"]),
        "--global-batch-size",
        str(scale["global_batch"]),
        "--micro-batch-size",
        str(scale["micro_batch"]),
        # The smoke preset samples its MLM generator at a raised temperature; the benchmarks' recipes
        # are their own (an arm or --model-set may still set one).
        "--generator-temperature",
        str(scale.get("generator_temperature", 1.0)),
        # the arm's own flags last: a later --lr or --model-set FIELD=VALUE wins over the scale's
        *[arg for name, value in scale["model_set"].items() for arg in ("--model-set", f"{name}={value}")],
        *flags,
    ]


def run_budget(scale: dict) -> list[str]:
    """A run ends after the scale's training minutes or, with `steps`, at that step (then every run of a
    seed ends at the same step whatever else loads the machine, and the final evaluation is at a matched
    step)."""
    if scale.get("steps"):
        return ["--max-steps", str(scale["steps"])]
    return ["--max-minutes", f"{scale['minutes']:.3f}", "--max-steps", "1000000"]


def budget_label(scale: dict) -> str:
    return f"{scale['steps']} steps" if scale.get("steps") else f"{scale['minutes']:.2f} min"


def free_port(taken: set[int]) -> int:
    """A port free on this host now and not given to a run still going."""
    import socket

    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def pretrain_all(runs: list[Run], scale: dict, data: Path, generator: str) -> None:
    """Every run through the trainer, `concurrency` at a time, each a world of one on a port of its own;
    fails naming the run that failed."""
    # A launcher's variables here (a shell inside a job, a process that set up a world of one) would send
    # every run to one rendezvous port: each run is a world of one of its own.
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    if scale["threads"]:
        env["OMP_NUM_THREADS"] = str(scale["threads"])
    pending, active = list(runs), []
    total, done = len(runs), 0
    while pending or active:
        while pending and len(active) < scale["concurrency"]:
            run = pending.pop(0)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run.run_dir / "stdout.log", "w")
            port = free_port({port for *_, port in active})
            process = subprocess.Popen(
                trainer_command(run, scale, data, generator),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                cwd=REPO,
            )
            active.append((run, process, time.time(), port))
            print(
                f"[{run.arm.name} seed {run.seed}] pre-training {budget_label(scale)} (log {run.run_dir}/stdout.log)",
                flush=True,
            )
        time.sleep(1.0)
        for entry in list(active):
            run, process, started, _ = entry
            if process.poll() is None:
                if not scale.get("steps") and time.time() - started > 60 * scale["minutes"] + 900:
                    process.terminate()
                continue
            active.remove(entry)
            if process.returncode != 0:
                for _, other, *_ in active:
                    other.terminate()
                raise SystemExit(
                    f"pretrain_vs_exit: the {run.arm.name} seed {run.seed} trainer failed "
                    f"(exit {process.returncode}); see {run.run_dir}/stdout.log"
                )
            done += 1
            print(f"[{run.arm.name} seed {run.seed}] done ({done}/{total})", flush=True)


# ---------------------------------------------------------------------------------- measurements
def time_to_reach_loss(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the piecewise-linear curve (minutes, loss) falls to `target`; None if never."""
    curve = sorted(curve)
    if curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / max(l0 - l1, 1e-12)
    return None


def extrapolated_time(curve: list[tuple[float, float]], target: float) -> float:
    """Minutes to `target` continuing the slope of the last third of the curve (never reached)."""
    curve = sorted(curve)
    tail = curve[-max(2, len(curve) // 3) :]
    (t0, l0), (t1, l1) = tail[0], tail[-1]
    end = curve[-1][0]
    slope = (l0 - l1) / max(t1 - t0, 1e-12)  # loss fallen per minute
    if slope <= 0:
        return 2 * end
    return min(2 * end, end + (l1 - target) / slope)


MIN_EXIT_SHARE = 2 / 3  # of an exit arm's steps with exits on, for its run to measure exits


def exit_warmup_steps(scale: dict) -> int:
    """The scale's exit warm-up: a share of the expected steps where it names one, else its own count."""
    if scale.get("exit_warmup_share") is not None:
        return max(1, round(scale["exit_warmup_share"] * scale["minutes"] * scale["steps_per_minute"]))
    return scale["exit_warmup_steps"]


def steps_with_exits(train_records: list[dict]) -> tuple[int, int]:
    """(steps with exits on, steps) of a run, from its metrics.jsonl training records."""
    if not train_records:
        return 0, 0
    with_exits = sum(
        record.get("steps_with_exits", record["steps"] if record.get("exit_threshold") is not None else 0)
        for record in train_records
    )
    return with_exits, train_records[-1]["step"]


def exit_share_shortfalls(summaries: list[dict], minimum: float = MIN_EXIT_SHARE) -> list[str]:
    """One line per exit-arm run whose exits were on for fewer than `minimum` of its steps."""
    lines = []
    for summary in summaries:
        if not summary["early_exit"]:
            continue
        if "steps_run" not in summary:  # a summary written before the count existed
            lines.append(f"{summary['arm']} seed {summary['seed']}: its summary has no count of steps with exits")
            continue
        on, steps = summary["steps_with_exits"], summary["steps_run"]
        if steps == 0 or on < minimum * steps - 1e-9:
            lines.append(
                f"{summary['arm']} seed {summary['seed']}: exits were on for {on} of its {steps} steps "
                f"({100 * on / max(steps, 1):.0f}%), under the {100 * minimum:.0f}% a comparison of exits needs"
            )
    return lines


def summarize_run(run: Run) -> dict:
    from dsexit.train.metrics import read_metrics

    evals = read_metrics(str(run.run_dir), "eval")
    train = read_metrics(str(run.run_dir))
    if not evals:
        raise SystemExit(f"pretrain_vs_exit: {run.run_dir} has no held-out evaluation records")
    # exits allowed: a threshold or a capacity level
    warm = [
        record
        for record in train
        if record.get("exit_threshold") is not None or record.get("capacity_level") is not None
    ]
    steps = sum(record["steps"] for record in warm)
    histogram = [sum(column) for column in zip(*(record["exit_layer_counts"] for record in (warm or train[-1:])))]
    final = evals[-1]
    on, steps_run = steps_with_exits(train)
    return {
        "arm": run.arm.name,
        "seed": run.seed,
        "early_exit": run.arm.early_exit,
        "run_dir": str(run.run_dir),
        "final_step": final["step"],
        "train_minutes": final["train_minutes"],
        "final": {key: final[key] for key in final if key.startswith(("eval_", "rtd_", "unigram"))},
        "compute_fraction": (
            sum(record["compute_fraction"] * record["steps"] for record in warm) / steps if steps else 1.0
        ),
        "tokens_seen": train[-1]["tokens_seen"] if train else 0,
        "steps_with_exits": on,
        "steps_run": steps_run,
        # share of the log intervals after exit warmup whose tau sat at the controller's floor
        "tau_at_floor_share": (
            sum(bool(record.get("tau_at_floor") or record.get("capacity_at_floor")) for record in warm) / len(warm)
            if warm
            else 0.0
        ),
        # capacity routing: share of exitable tokens forced out below the floor, after exit warmup
        "forced_exit_share": (
            sum(record.get("forced_exit_share", 0.0) * record["steps"] for record in warm) / steps if steps else 0.0
        ),
        "exit_layer_histogram": histogram,
        "curve": [
            {
                "minutes": record["train_minutes"],
                "step": record["step"],
                "rtd_loss_uniform": record["eval_rtd_loss_uniform"],
                "auc_uniform": record["eval_rtd_auc_uniform"],
                "rtd_loss_generator": record["eval_rtd_loss_generator"],
                "mlm_loss": record["eval_mlm_loss"],
                "compute_fraction": record["eval_compute_fraction"],
            }
            for record in evals
        ],
    }


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


# An exit arm whose compute after exit warmup stays at or above this share of full depth hardly let
# any token out: it measures the exit heads' training, not exits, and is never the best arm.
EXITS_RAN_BELOW = 0.98


def heldout_curve(run: dict, x: str) -> tuple[list[float], list[float]]:
    """The run's held-out RTD loss against `x` ("minutes" or "step"), x strictly increasing."""
    xs, ys = [], []
    for point in sorted(run["curve"], key=lambda point: point[x]):
        if xs and point[x] <= xs[-1]:
            continue  # a repeated evaluation at the same step or minute: the first one stands
        xs.append(float(point[x]))
        ys.append(float(point["rtd_loss_uniform"]))
    return xs, ys


def smoothed_curve(run: dict) -> list[tuple[float, float]]:
    """(minutes, held-out loss) fitted non-increasing (isotonic), for "when did it first reach X"."""
    minutes, losses = heldout_curve(run, "minutes")
    return list(zip(minutes, isotonic_non_increasing(losses)))


def exit_state(run: dict) -> str:
    """ "off" (a no-exit arm), "never started" (the run ended inside its exit warmup), "did not exit"
    (compute stayed >= EXITS_RAN_BELOW after warmup) or "ran"."""
    if not run["early_exit"]:
        return "off"
    started = run.get("steps_with_exits")
    if started == 0 or (started is None and run["compute_fraction"] >= 1.0):
        return "never started"
    return "ran" if run["compute_fraction"] < EXITS_RAN_BELOW else "did not exit"


def paired_with_baseline(run: dict, baseline: dict) -> dict:
    """One seed's arm against the same seed's baseline: held-out loss differences at the largest step
    and the largest training minute both reached (interpolated between evaluations), and time to
    the baseline's final loss on both runs' smoothed curves."""
    matched_step = min(run["curve"][-1]["step"], baseline["curve"][-1]["step"])
    matched_minutes = min(run["curve"][-1]["minutes"], baseline["curve"][-1]["minutes"])
    run_smoothed, baseline_smoothed = smoothed_curve(run), smoothed_curve(baseline)
    target = baseline_smoothed[-1][1]
    baseline_minutes = time_to_reach_loss(baseline_smoothed, target)
    minutes = time_to_reach_loss(run_smoothed, target)
    reached = minutes is not None
    if not reached:
        minutes = extrapolated_time(run_smoothed, target)
    return {
        "seed": run["seed"],
        "matched_step": matched_step,
        "delta_at_matched_step": value_at(*heldout_curve(run, "step"), matched_step)
        - value_at(*heldout_curve(baseline, "step"), matched_step),
        "matched_minutes": matched_minutes,
        "delta_at_matched_minutes": value_at(*heldout_curve(run, "minutes"), matched_minutes)
        - value_at(*heldout_curve(baseline, "minutes"), matched_minutes),
        "target_rtd_loss": target,
        "baseline_minutes_to_target": baseline_minutes,
        "minutes_to_target": minutes,
        "reached": reached,
        "time_saved_pct": 100.0 * (1.0 - minutes / baseline_minutes) if baseline_minutes > 0 else float("nan"),
    }


def compare(summaries: list[dict]) -> dict:
    """Per arm, against the baseline of the same seed: held-out loss differences at matched steps
    and matched minutes, and the time saved to the baseline's final loss, each with its t-interval
    over seeds; the best arm among those whose exits ran."""
    by_arm: dict[str, dict[int, dict]] = {}
    for summary in summaries:
        by_arm.setdefault(summary["arm"], {})[summary["seed"]] = summary
    baseline = by_arm["baseline"]
    arms = {}
    for name, runs_by_seed in by_arm.items():
        runs = list(runs_by_seed.values())
        states = [exit_state(run) for run in runs]
        row = {
            "early_exit": runs[0]["early_exit"],
            "seeds": len(runs),
            "compute_fraction": statistics.fmean(run["compute_fraction"] for run in runs),
            "exit_states": states,
            "heldout_rtd_loss": _spread([run["final"]["eval_rtd_loss_uniform"] for run in runs]),
            "auc_uniform": _spread([run["final"]["eval_rtd_auc_uniform"] for run in runs]),
            "heldout_rtd_loss_exit_rule": _spread([run["final"]["eval_rtd_loss_uniform_exit"] for run in runs]),
            "steps": _spread([float(run["final_step"]) for run in runs]),
            "budget_minutes": statistics.fmean(run["train_minutes"] for run in runs),
            "tau_at_floor_share": statistics.fmean(run.get("tau_at_floor_share", 0.0) for run in runs),
            "forced_exit_share": statistics.fmean(run.get("forced_exit_share", 0.0) for run in runs),
        }
        row["exits_ran"] = row["early_exit"] and row["compute_fraction"] < EXITS_RAN_BELOW
        pairs = [
            paired_with_baseline(run, baseline[seed]) for seed, run in sorted(runs_by_seed.items()) if seed in baseline
        ]
        row["paired_seeds"] = pairs
        if name == "baseline":
            row["minutes_to_target"] = _spread([pair["baseline_minutes_to_target"] for pair in pairs])
        elif pairs:
            row["minutes_to_target"] = _spread([pair["minutes_to_target"] for pair in pairs])
            row["reached"] = [pair["reached"] for pair in pairs]
            row["reached_all"] = all(row["reached"])
            for quantity in ("delta_at_matched_step", "delta_at_matched_minutes", "time_saved_pct"):
                row[quantity] = t_interval([pair[quantity] for pair in pairs])
            row["heldout_rtd_delta"] = row["delta_at_matched_minutes"]["mean"]
        arms[name] = row
    eligible = [name for name, row in arms.items() if row["exits_ran"] and "time_saved_pct" in row]
    best = max(eligible, key=lambda name: arms[name]["time_saved_pct"]["mean"]) if eligible else None
    return {
        "target_rtd_loss": statistics.fmean(pair["target_rtd_loss"] for pair in arms["baseline"]["paired_seeds"]),
        "arms": arms,
        "best_exit_arm": best,
        "rtd_prior_entropy": next(iter(baseline.values()))["final"]["rtd_prior_entropy"],
    }


ROUTING_MIN_SEEDS = 3  # the MLM recipe's study runs three seeds: a wide (t, 2 df) interval, but one


def routing_comparison(summaries: list[dict]) -> dict:
    """Routing against routing at each target compute, paired by seed: the held-out RTD loss at full
    depth and under the exit rule (each run at its last tau or capacity level) at the largest step
    both runs reached, and the exit rule's compute. Empty unless the routing arms ran."""
    by_arm: dict[str, dict[int, dict]] = {}
    for summary in summaries:
        by_arm.setdefault(summary["arm"], {})[summary["seed"]] = summary
    rows = []
    for target in ROUTING_TARGETS:
        for first, second in ROUTING_PAIRS:
            a, b = (by_arm.get(ROUTING_ARMS[name].format(target), {}) for name in (first, second))
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            full, exit_rule, compute, eval_compute, steps = [], [], [], [], []
            for seed in seeds:
                step = min(a[seed]["curve"][-1]["step"], b[seed]["curve"][-1]["step"])
                steps.append(step)
                full.append(
                    value_at(*heldout_curve(a[seed], "step"), step) - value_at(*heldout_curve(b[seed], "step"), step)
                )
                if a[seed]["final_step"] == b[seed]["final_step"]:  # the exit rule is evaluated at the end only
                    exit_rule.append(
                        a[seed]["final"]["eval_rtd_loss_uniform_exit"] - b[seed]["final"]["eval_rtd_loss_uniform_exit"]
                    )
                    eval_compute.append(
                        (a[seed]["curve"][-1]["compute_fraction"], b[seed]["curve"][-1]["compute_fraction"])
                    )
                compute.append(a[seed]["compute_fraction"] - b[seed]["compute_fraction"])
            rows.append(
                {
                    "target": float(target),
                    "arms": [first, second],
                    "seeds": seeds,
                    "matched_step": min(steps),
                    "delta_full_depth": t_interval(full, min_n=ROUTING_MIN_SEEDS),
                    "delta_exit_rule": t_interval(exit_rule, min_n=ROUTING_MIN_SEEDS),
                    "delta_compute": t_interval(compute, min_n=ROUTING_MIN_SEEDS),
                    # the compute each exit rule ran at on the held-out samples (the exit-rule losses' own)
                    "exit_rule_compute": [statistics.fmean(pair) for pair in zip(*eval_compute)]
                    if eval_compute
                    else None,
                }
            )
    return {"routing": rows} if rows else {}


def format_routing(rows: list[dict]) -> str:
    header = (
        f"{'target':>6}  {'pair':<22} {'seeds':>5} {'step':>5}  {'delta held-out, full depth':>32}  "
        f"{'delta held-out, exit rule':>32}  {'at compute':>12}  {'delta compute':>28}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['target']:>6.2f}  {' - '.join(row['arms']):<22} {len(row['seeds']):>5} {row['matched_step']:>5}  "
            f"{_with_interval(row['delta_full_depth'], '{:+.4f}'):>32}  "
            f"{_with_interval(row['delta_exit_rule'], '{:+.4f}'):>32}  "
            f"{'/'.join(f'{value:.3f}' for value in row['exit_rule_compute'] or ()):>12}  "
            f"{_with_interval(row['delta_compute'], '{:+.3f}'):>28}"
        )
    return "\n".join(lines)


def routing_result_lines(rows: list[dict]) -> list[str]:
    """One RESULT line per target: each pair's exit-rule delta with its interval and whether it is resolved."""
    lines = []
    for target in sorted({row["target"] for row in rows}, reverse=True):
        parts = []
        for row in (row for row in rows if row["target"] == target):
            delta = row["delta_exit_rule"]
            name = "_minus_".join(row["arms"])
            low, high = (f"{delta[key]:+.4f}" if delta[key] is not None else "n/a" for key in ("low", "high"))
            parts.append(f"{name}={delta['mean']:+.4f} [{low},{high}] resolved={'yes' if delta['resolved'] else 'no'}")
        lines.append(f"RESULT routing_quality target={target:.2f} seeds={len(rows[0]['seeds'])} " + " ".join(parts))
    return lines


# ---------------------------------------------------------------------------------- precondition
def scratch_export(run_dir: Path, out_dir: Path, seed: int) -> str:
    """A randomly initialised discriminator of the run's shape: the untrained reference."""
    import torch

    from dsexit.data import save_hf_tokenizer
    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
    from dsexit.model.hf import to_hf_pretraining

    resolved = json.loads((run_dir / "config.json").read_text())
    torch.manual_seed(seed)
    model = ElectraPreTrainingModel(ElectraExitConfig.from_saved(resolved["model"]))
    to_hf_pretraining(model).save_pretrained(out_dir)
    save_hf_tokenizer(resolved["derived"]["data_url"], str(out_dir))
    return str(out_dir)


def precondition(baseline: Path, work: Path, task, scale: dict, seed: int) -> dict:
    """Untrained vs the baseline's final checkpoint, fine-tuned (ELECTRA's recipe) and probed."""
    from dsexit.eval import FinetuneConfig, finetune_many
    from dsexit.train.checkpoint.files import complete_checkpoints
    from dsexit.train.export import export_hf

    untrained = scratch_export(baseline, work / "untrained-hf", seed)
    trained = str(baseline / "hf-final")
    export_hf(complete_checkpoints(str(baseline / "checkpoints"))[-1].path, trained, with_generator=False)
    verdict = {}
    for mode in ("finetune", "probe"):
        config = FinetuneConfig(mode=mode, seeds=scale["finetune_seeds"], progress="none", **scale["finetune"])
        config.validate()
        started = time.time()
        untrained_result, trained_result = finetune_many(
            [untrained, trained], task, config, workers=scale["finetune_workers"]
        )
        medians = {
            name: result["median"] for name, result in (("untrained", untrained_result), ("pretrained", trained_result))
        }
        verdict[mode] = {
            **medians,
            "beats": medians["pretrained"]["dev"]["accuracy"] > medians["untrained"]["dev"]["accuracy"],
            "seeds": config.seeds,
            "minutes": (time.time() - started) / 60,
            "per_seed_dev": {
                "untrained": [r["dev"]["accuracy"] for r in untrained_result["per_seed"]],
                "pretrained": [r["dev"]["accuracy"] for r in trained_result["per_seed"]],
            },
        }
        print(
            f"  {mode}: untrained dev {medians['untrained']['dev']['accuracy']:.4f} test "
            f"{medians['untrained']['test']['accuracy']:.4f} | pre-trained dev "
            f"{medians['pretrained']['dev']['accuracy']:.4f} test {medians['pretrained']['test']['accuracy']:.4f} "
            f"({verdict[mode]['minutes']:.1f} min)",
            flush=True,
        )
    return verdict


# ---------------------------------------------------------------------------------- report
def plot(summaries: list[dict], comparison: dict, out_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}
    paths = []
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for summary in summaries:
        color = colors.setdefault(summary["arm"], f"C{len(colors)}")
        minutes = [point["minutes"] for point in summary["curve"]]
        label = (
            summary["arm"]
            if summary["seed"] == min(s["seed"] for s in summaries if s["arm"] == summary["arm"])
            else None
        )
        loss_axis.plot(
            minutes, [point["rtd_loss_uniform"] for point in summary["curve"]], color=color, label=label, alpha=0.8
        )
        auc_axis.plot(
            minutes, [point["auc_uniform"] for point in summary["curve"]], color=color, label=label, alpha=0.8
        )
    loss_axis.axhline(comparison["rtd_prior_entropy"], color="gray", linestyle="--", label="replaced-token prior")
    loss_axis.axhline(comparison["target_rtd_loss"], color="black", linestyle=":", label="baseline's final (target)")
    loss_axis.set(
        xlabel="training minutes (held-out evaluation excluded)",
        ylabel="held-out RTD loss (uniform corruption)",
        title="held-out quality vs pre-training time",
    )
    auc_axis.set(xlabel="training minutes", ylabel="held-out RTD ROC-AUC", title="held-out ROC-AUC")
    loss_axis.legend(fontsize=8)
    paths.append(_save(figure, out_prefix.with_name(out_prefix.name + "_heldout.png")))

    figure, axis = plt.subplots(figsize=(7, 4))
    arm_names = list(colors)
    width = 0.8 / len(arm_names)
    for index, name in enumerate(arm_names):
        counts = [sum(column) for column in zip(*(s["exit_layer_histogram"] for s in summaries if s["arm"] == name))]
        total = max(sum(counts), 1)
        axis.bar(
            [layer + 1 + (index - len(arm_names) / 2 + 0.5) * width for layer in range(len(counts))],
            [count / total for count in counts],
            width=width,
            label=name,
            color=colors[name],
        )
    axis.set(
        xlabel="last layer a token ran through",
        ylabel="fraction of exitable tokens (after exit warmup)",
        title="exit-layer histogram",
    )
    axis.legend(fontsize=8)
    paths.append(_save(figure, out_prefix.with_name(out_prefix.name + "_exit_layers.png")))
    return paths


def _save(figure, path: Path) -> str:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def _with_interval(summary: dict | None, template: str) -> str:
    """ "mean [low, high]" in `template`'s format; "[n/a]" where there are too few seeds for one."""
    if summary is None:
        return "-"
    if summary["low"] is None:
        return f"{template.format(summary['mean'])} [n/a]"
    return f"{template.format(summary['mean'])} [{template.format(summary['low'])}, {template.format(summary['high'])}]"


def _exits_label(states: list[str]) -> str:
    counts = {state: states.count(state) for state in dict.fromkeys(states)}
    if len(counts) == 1:
        return states[0]
    return ", ".join(f"{state} {count}/{len(states)}" for state, count in counts.items())


def format_table(comparison: dict) -> str:
    columns = [
        ("arm", 15, "<"),
        ("seeds", 5, ">"),
        ("compute", 7, ">"),
        ("exits", 13, "<"),
        ("steps", 14, ">"),
        ("held-out RTD", 12, ">"),
        ("exit rule", 9, ">"),
        ("delta, matched step", 33, ">"),
        ("delta, matched minutes", 33, ">"),
        ("min to target", 18, ">"),
        ("time saved %", 24, ">"),
        ("reached", 7, ">"),
    ]
    header = " ".join(f"{name:{align}{width}}" for name, width, align in columns)
    lines = [header, "-" * len(header)]
    for name, arm in comparison["arms"].items():
        steps, reach = arm["steps"], arm.get("minutes_to_target")
        cells = [
            name,
            str(arm["seeds"]),
            f"{arm['compute_fraction']:.3f}",
            _exits_label(arm["exit_states"]),
            f"{steps['mean']:.0f} ({steps['min']:.0f}-{steps['max']:.0f})",
            f"{arm['heldout_rtd_loss']['mean']:.4f}",
            f"{arm['heldout_rtd_loss_exit_rule']['mean']:.4f}",
            _with_interval(arm.get("delta_at_matched_step"), "{:+.4f}"),
            _with_interval(arm.get("delta_at_matched_minutes"), "{:+.4f}"),
            f"{reach['mean']:.2f} ({reach['min']:.2f}-{reach['max']:.2f})" if reach else "-",
            _with_interval(arm.get("time_saved_pct"), "{:+.1f}"),
            f"{sum(arm['reached'])}/{len(arm['reached'])}" if "reached" in arm else "-",
        ]
        lines.append(" ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, columns)))
    return "\n".join(lines)


def machine_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores (shared)"


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the scale's whole path with a tiny model, seconds per run (checks it on a CPU)",
    )
    parser.add_argument("--minutes", type=float, help="training minutes per run (default: the scale's)")
    parser.add_argument(
        "--steps",
        type=int,
        help="end every run at this step instead of after --minutes (default: the scale's; routing: 400)",
    )
    parser.add_argument(
        "--generator-temperature",
        type=float,
        help="sampling temperature of the MLM generator (default: the scale's, 1; the learning recipe: 2)",
    )
    parser.add_argument("--seeds", type=int, help="pre-training seeds per arm (default: the scale's)")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="runs at a time (default: the scale's; all arms at once shares the machine alike)",
    )
    parser.add_argument("--arms", nargs="+", choices=[arm.name for arm in ARMS], help="default: the scale's")
    parser.add_argument(
        "--generator",
        choices=("mlm", "uniform", "unigram"),
        help="replacements of the baseline and exit arms (default: the scale's)",
    )
    parser.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra model field for every arm (e.g. a recipe from bench/plateau.py)",
    )
    parser.add_argument("--no-precondition", action="store_true", help="skip the downstream precondition")
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    parser.add_argument("--vocab", type=Path, default=SHARED / "tokenizer" / "bert-base-uncased-vocab.txt")
    parser.add_argument("--task", type=Path, default=SHARED / "downstream" / "rt_sentiment")
    parser.add_argument("--data-cache", type=Path, help="prepared dataset (default: runs/bench_data/SCALE-heldout)")
    parser.add_argument("--work-dir", type=Path, help="default: runs/bench_pretrain_vs_exit/SCALE")
    parser.add_argument("--out", type=Path, help="default: bench/results/pretrain_vs_exit[_SCALE].json")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="recompute the comparison, table and plots of a finished run from its JSON (no training)",
    )
    args = parser.parse_args(argv)
    return args


def resolve_scale(args: argparse.Namespace) -> dict:
    scale = {**SCALES[args.scale], **(DRY_RUN if args.dry_run else {})}
    scale["model_set"] = dict(scale["model_set"])
    for item in args.model_set:
        name, _, value = item.partition("=")
        scale["model_set"][name] = value
    for name in ("minutes", "steps", "seeds", "arms", "generator", "generator_temperature", "concurrency"):
        if getattr(args, name) is not None:
            scale[name] = getattr(args, name)
    if "baseline" not in scale["arms"]:
        raise SystemExit("pretrain_vs_exit: --arms must include baseline (every comparison is against it)")
    return scale


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        if refuse_comparison(results["runs"]):
            return NO_COMPARISON
        results.update(compare(results["runs"]))
        results.update(routing_comparison(results["runs"]))
        results["plots"] = plot(results["runs"], results, args.report.with_suffix(""))
        args.report.write_text(json.dumps(results, indent=1, default=str))
        report(results, args.report)
        return 0
    started = time.time()
    scale = resolve_scale(args)
    tag = args.scale + ("-dry-run" if args.dry_run else "")
    out = args.out or RESULTS / (
        "pretrain_vs_exit.json" if args.scale == "quick" and not args.dry_run else f"pretrain_vs_exit_{tag}.json"
    )
    work = args.work_dir or REPO / "runs" / "bench_pretrain_vs_exit" / tag
    from dsexit.eval import load_task

    task = load_task(str(args.task))  # a bad task fails before any pre-training
    data = prepare_corpus(
        args.corpus,
        scale["corpus_files"],
        args.data_cache
        or REPO
        / "runs"
        / "bench_data"
        / f"{scale.get('data_cache', args.scale)}{'-dry-run' if args.dry_run else ''}-heldout",
        tokenizer_spec(scale, args.vocab),
        scale["seq_len"],
    )
    arms = [arm for arm in ARMS if arm.name in scale["arms"]]
    runs = [
        Run(arm, args.seed + offset, work / f"{arm.name}-seed{args.seed + offset}")
        for offset in range(scale["seeds"])
        for arm in arms
    ]
    print(
        f"pretrain_vs_exit: {len(arms)} arms x {scale['seeds']} seeds, {budget_label(scale)} of training each, "
        f"{scale['concurrency']} at a time, generator {scale['generator']}",
        flush=True,
    )
    pretrain_all(runs, scale, data, scale["generator"])
    summaries = [summarize_run(run) for run in runs]
    if refuse_comparison(summaries):
        out.parent.mkdir(parents=True, exist_ok=True)
        refused = out.with_name(out.stem + "_refused.json")
        refused.write_text(json.dumps({"scale": args.scale, "runs": summaries}, indent=1, default=str))
        print(f"the runs' summaries: {refused}")
        return NO_COMPARISON
    comparison = {**compare(summaries), **routing_comparison(summaries)}
    results = {
        "scale": args.scale,
        "dry_run": args.dry_run,
        "generator": scale["generator"],
        "minutes_per_run": scale["minutes"],
        "steps_per_run": scale.get("steps"),
        "generator_temperature": scale.get("generator_temperature", 1.0),
        "concurrency": scale["concurrency"],
        "model_set": scale["model_set"],
        "machine": machine_description(),
        "runs": summaries,
        **comparison,
    }
    results["benchmark_minutes"] = (time.time() - started) / 60
    out.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(summaries, comparison, out.with_suffix(""))
    out.write_text(json.dumps(results, indent=1, default=str))  # the comparison stands even if what follows is cut off
    report(results, out)
    if not args.no_precondition:
        from dsexit.train.cluster.distributed import select_accelerator

        select_accelerator()
        print(
            "precondition: untrained vs pre-trained (baseline, first seed), downstream "
            f"{task.name}, median of {scale['finetune_seeds']} seeds",
            flush=True,
        )
        results["precondition"] = precondition(Path(summaries[0]["run_dir"]), work, task, scale, args.seed)
    results["benchmark_minutes"] = (time.time() - started) / 60
    out.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(summaries, comparison, out.with_suffix(""))
    out.write_text(json.dumps(results, indent=1, default=str))
    report(results, out)
    return 0


def result_line(comparison: dict) -> str:
    """The last line: the best arm whose exits ran, its time saved with the interval, and whether
    that interval excludes zero."""
    best = comparison["best_exit_arm"]
    if best is None:
        return (
            "RESULT pretrain_vs_exit time_saved_pct=n/a ci_low=n/a ci_high=n/a heldout_rtd_delta=n/a seeds=0 "
            "resolved=no best_arm=none"
        )
    arm = comparison["arms"][best]
    saved = arm["time_saved_pct"]
    low, high = (f"{saved[key]:.1f}" if saved[key] is not None else "n/a" for key in ("low", "high"))
    return (
        f"RESULT pretrain_vs_exit time_saved_pct={saved['mean']:.1f} ci_low={low} ci_high={high} "
        f"heldout_rtd_delta={arm['heldout_rtd_delta']:+.4f} seeds={saved['n']} "
        f"resolved={'yes' if saved['resolved'] else 'no'} best_arm={best}"
    )


NO_COMPARISON = 3  # exit status when the exit arms did not run with exits long enough to compare


def refuse_comparison(summaries: list[dict]) -> bool:
    """Prints why and returns True when some exit arm had exits on for too few of its steps."""
    shortfalls = exit_share_shortfalls(summaries)
    if not shortfalls:
        return False
    for line in shortfalls:
        print(f"pretrain_vs_exit: {line}")
    print(
        "pretrain_vs_exit: no comparison published: an exit arm that ran mostly without exits measures no "
        "exits (raise --minutes, or lower the scale's exit warm-up)"
    )
    return True


def report(results: dict, out: Path) -> None:
    print()
    print(
        f"pretrain_vs_exit: scale={results['scale']}{' (dry run)' if results['dry_run'] else ''}, "
        f"generator={results['generator']} (temperature {results.get('generator_temperature', 1.0):g}), "
        + (
            f"{results['steps_per_run']} steps per run, "
            if results.get("steps_per_run")
            else f"{results['minutes_per_run']:.2f} training minutes per run, "
        )
        + f"{results['concurrency']} run(s) at a time, whole benchmark {results['benchmark_minutes']:.1f} min on "
        f"{results['machine']}"
    )
    print(format_table(results))
    print(
        "Every arm against the baseline of the same seed (same initial weights and data order), mean over seeds "
        f"[95% Student-t interval; n/a below {MIN_SEEDS_FOR_INTERVAL} seeds]. held-out RTD = final held-out RTD "
        "loss at full depth (uniform corruption); exit rule = the same with the arm's exits at its last tau or "
        "capacity level; "
        "delta = arm - baseline held-out loss at the largest step / training minute both runs reached "
        "(interpolated between evaluations); min to target = training minutes until the arm's isotonic "
        "(non-increasing) held-out curve reaches the same seed's baseline's final smoothed loss (mean target "
        f"{results['target_rtd_loss']:.4f}; replaced-token prior {results['rtd_prior_entropy']:.4f}); for the "
        "baseline, its own time to that loss; time saved = 1 - arm's / baseline's minutes, per seed; reached = "
        "seeds whose arm reached the target in its budget (the others are extrapolated from the slope of the last "
        "third of the curve, twice the budget where flat); compute = executed / full token-layers of exitable "
        f"tokens after exit warmup; exits: ran (compute < {EXITS_RAN_BELOW}), did not exit, never started (the "
        "run ended inside its exit warmup), off"
    )
    for name, arm in results["arms"].items():
        if "time_saved_pct" in arm:
            print(
                f"{name}: resolved (interval excludes 0): delta at matched step "
                f"{'yes' if arm['delta_at_matched_step']['resolved'] else 'no'}, at matched minutes "
                f"{'yes' if arm['delta_at_matched_minutes']['resolved'] else 'no'}, time saved "
                f"{'yes' if arm['time_saved_pct']['resolved'] else 'no'}"
                + (
                    f"; the floor held tau or capacity in {100 * arm['tau_at_floor_share']:.0f}% of log intervals"
                    f"; forced out below the floor: {100 * arm.get('forced_exit_share', 0.0):.1f}% of tokens"
                    if arm["early_exit"]
                    else ""
                )
                + ("" if arm["exits_ran"] or not arm["early_exit"] else "; exits did not run: not a candidate")
            )
    verdict = results.get("precondition")
    if verdict:
        parts = [
            f"{mode}: pre-trained dev {v['pretrained']['dev']['accuracy']:.4f} vs untrained "
            f"{v['untrained']['dev']['accuracy']:.4f} ({'beats' if v['beats'] else 'does not beat'})"
            for mode, v in verdict.items()
        ]
        beats = all(v["beats"] for v in verdict.values())
        print(f"PRECONDITION pretraining_beats_untrained={'yes' if beats else 'no'} " + "; ".join(parts))
        if not beats:
            print("downstream cannot resolve the arms at this budget: the held-out RTD loss above is the measure")
    if results.get("routing"):
        print()
        print(format_routing(results["routing"]))
        print(
            "Routing against routing at the same target compute, paired by seed (same initial weights and data "
            f"order): mean difference [95% Student-t interval; n/a below {ROUTING_MIN_SEEDS} seeds] of the held-out "
            "RTD loss at the largest step both reached (full depth), of the same under each run's own exit rule at "
            "its last tau or capacity level (exit rule; negative = the first routing's exits lose less; at compute = "
            "the compute each exit rule ran at on the held-out samples, first/second), and of the training compute "
            "after exit warm-up"
        )
    print(f"plots: {', '.join(results['plots'])}; json: {out}")
    for line in routing_result_lines(results.get("routing", [])):
        print(line)
    print(result_line(results))


if __name__ == "__main__":
    sys.exit(main())
