"""Does early exit buy downstream quality per unit of pre-training wall clock?

Four arms pre-train with the same wall-clock budget through the real trainer
(`launch/pretrain.py`, one process each, `--max-minutes`, periodic checkpoints):

    baseline    no exit, generator mlm
    exit-0.75   early exit, controller target_compute 0.75
    exit-0.50   early exit, controller target_compute 0.5
    uniform     no exit, generator uniform (the generator study)

Then checkpoints part-way through and at the end of each arm's run (plus a randomly initialised
model, the common starting point at t=0) are exported with the trainer's export code and
fine-tuned on a downstream task (`dsexit.eval.finetune`, median over seeds). It prints one
table and, for each early-exit arm, the pre-train wall clock it needed to reach the
baseline's final dev accuracy (linear interpolation between its checkpoints); plots and a
JSON land in bench/results/. The last line is

    RESULT pretrain_vs_exit time_saved_pct=<best exit arm> acc_delta=<its test acc - baseline's, equal time>

time_saved_pct is nan when no early-exit arm reached the baseline's dev accuracy.

Pre-train time of a checkpoint = its completion time minus the start of the training loop
(the run's config.json is written just before step 1): wall clock, checkpoint saves
included. CPU seconds of each trainer process are sampled from /proc as well.

    python bench/pretrain_vs_exit.py --scale quick --budget-minutes 60   # 2-core CPU: measured 57 min
    python bench/pretrain_vs_exit.py --scale full --budget-minutes 1440  # GPU: electra-small, arms one after another

`--scale quick` runs the four arms at once (one thread each) so that the background load
of a shared machine hits all arms alike, gives them 58% of the budget, and fine-tunes two
jobs at a time; `--scale full` runs the arms one after another with 45% of the budget.
Fine-tuning jobs (every model x seed) go through `dsexit.eval.finetune_many`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    Arm("exit-0.75", ["--exit", "--target-compute", "0.75"], True),
    Arm("exit-0.50", ["--exit", "--target-compute", "0.5"], True),
    Arm("uniform", ["--no-exit", "--generator", "uniform"], False),
]

# A 6-layer, 128-wide discriminator (generator 32 wide, 2 layers): small enough for minutes on
# a CPU, yet the discriminator is most of a step's FLOPs, as in ELECTRA-Small, so that early
# exit can show in the wall clock.
QUICK_MODEL = dict(embedding_size=64, hidden_size=128, num_hidden_layers=6, num_attention_heads=2,
                   intermediate_size=512, generator_hidden_size=32, generator_num_hidden_layers=2,
                   generator_num_attention_heads=1, min_exit_layer=2, max_position_embeddings=128,
                   head_bias_init="prior")

SCALES = {
    # 2-core CPU, whole benchmark in --budget-minutes (60): an 8192-piece SentencePiece trained on
    # the corpus and 64-token samples (a 30522-entry vocabulary costs the small model most of its
    # steps); arms concurrent, one thread each; fine-tuning on a 3000-example slice of the task
    # (4 epochs, seq 64), two jobs at a time; checkpoints at half and end of each run.
    "quick": dict(tokenizer="train:8192", seq_len=64, train_preset="smoke", model="electra-tiny",
                  model_set=QUICK_MODEL, lr=1e-3, global_batch=32, micro_batch=32, max_steps=100000,
                  warmup_steps=50, exit_warmup_steps=100, save_interval=250, log_interval=20, concurrent=True,
                  threads=1, fractions=(0.5, 1.0), pretrain_share=0.58, finetune_workers=2,
                  finetune=dict(lr=3e-4, epochs=4, batch_size=32, max_seq_len=64, max_train_examples=3000)),
    # ELECTRA-Small (Clark et al. 2020) on one GPU, BERT's WordPiece vocabulary and 128-token
    # samples, arms one after another; GLUE-like fine-tuning on the full train split.
    "full": dict(tokenizer="wordpiece", seq_len=128, train_preset="small", model="electra-small", model_set={},
                 lr=None, global_batch=None, micro_batch=None, max_steps=1_000_000, warmup_steps=10000,
                 exit_warmup_steps=10000, save_interval=20000, log_interval=100, concurrent=False, threads=None,
                 fractions=(0.25, 0.5, 0.75, 1.0), pretrain_share=0.45, finetune_workers=1,
                 finetune=dict(lr=3e-4, epochs=3, batch_size=32, max_seq_len=128, max_train_examples=None)),
}


# ---------------------------------------------------------------------------------- data
def prepare_corpus(corpus: Path, cache: Path, tokenizer: str, seq_len: int) -> Path:
    if (cache / "index.json").exists():
        return cache
    print(f"preparing {corpus} -> {cache} (once)", flush=True)
    subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), "--input", str(corpus / "*.jsonl.gz"),
                    "--out", str(cache), "--tokenizer", tokenizer, "--seq-len", str(seq_len)], check=True)
    return cache


def tokenizer_spec(scale: dict, vocab: Path) -> str:
    return f"wordpiece:{vocab}" if scale["tokenizer"] == "wordpiece" else scale["tokenizer"]


# ---------------------------------------------------------------------------------- pre-training
@dataclass
class ArmRun:
    arm: Arm
    run_dir: Path
    process: subprocess.Popen | None = None
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)  # (wall time, CPU seconds)


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def trainer_command(arm: Arm, run_dir: Path, scale: dict, data: Path, minutes: float, seed: int) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), "--preset", scale["train_preset"],
            "--model", scale["model"], "--data", str(data), "--run-dir", str(run_dir), "--seed", str(seed),
            "--max-minutes", f"{minutes:.3f}", "--max-steps", str(scale["max_steps"]),
            "--warmup-steps", str(scale["warmup_steps"]), "--exit-warmup-steps", str(scale["exit_warmup_steps"]),
            "--save-interval", str(scale["save_interval"]), "--keep-last", "1000000",
            "--log-interval", str(scale["log_interval"]), "--no-export-hf", "--no-tensorboard", "--no-csv",
            "--progress", "lines", "--resume", "none", *arm.flags,
            *(["--lr", str(scale["lr"])] if scale["lr"] else []),
            *(["--global-batch-size", str(scale["global_batch"])] if scale["global_batch"] else []),
            *(["--micro-batch-size", str(scale["micro_batch"])] if scale["micro_batch"] else []),
            *[arg for name, value in scale["model_set"].items() for arg in ("--model-set", f"{name}={value}")]]


def pretrain(arms: list[Arm], work: Path, scale: dict, data: Path, minutes: float, seed: int) -> list[ArmRun]:
    runs = [ArmRun(arm, work / arm.name) for arm in arms]
    groups = [runs] if scale["concurrent"] else [[run] for run in runs]
    env = dict(os.environ)
    if scale["threads"]:
        env["OMP_NUM_THREADS"] = str(scale["threads"])
    for group in groups:
        for run in group:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run.run_dir / "stdout.log", "w")
            run.process = subprocess.Popen(trainer_command(run.arm, run.run_dir, scale, data, minutes, seed),
                                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            print(f"[{run.arm.name}] pre-training {minutes:.1f} min (pid {run.process.pid}, log {run.run_dir}/stdout.log)",
                  flush=True)
        started = time.time()
        while any(run.process.poll() is None for run in group):
            for run in group:
                if run.process.poll() is None and (cpu := _cpu_seconds(run.process.pid)) is not None:
                    run.cpu_samples.append((time.time(), cpu))
            time.sleep(2.0)
            if time.time() - started > 60 * minutes + 600:
                for run in group:
                    if run.process.poll() is None:
                        run.process.terminate()
        for run in group:
            if run.process.returncode != 0:
                raise SystemExit(f"pretrain_vs_exit: the {run.arm.name} trainer failed (exit {run.process.returncode}); "
                                 f"see {run.run_dir}/stdout.log")
            print(f"[{run.arm.name}] pre-training done", flush=True)
    return runs


# ---------------------------------------------------------------------------------- measurements
def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return points[-1][1]


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the piecewise-linear curve (time, accuracy) reaches target; None if never."""
    curve = sorted(curve)
    if curve[0][1] >= target:
        return curve[0][0]
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / max(a1 - a0, 1e-12)
    return None


def summarize_run(run: ArmRun, exit_warmup_steps: int) -> dict:
    from dsexit.train.checkpoint import complete_checkpoints
    from dsexit.train.metrics import read_metrics

    start = os.path.getmtime(run.run_dir / "config.json")  # written just before the first step
    records = read_metrics(str(run.run_dir))
    after_warmup = [r for r in records if r["step"] - r["steps"] >= exit_warmup_steps] or records[-1:]
    steps = sum(r["steps"] for r in after_warmup)
    histogram = [sum(column) for column in zip(*(r["exit_layer_counts"] for r in after_warmup))]
    checkpoints = [{"step": ref.step, "path": ref.path, "tokens_seen": ref.meta["tokens_seen"],
                    "seconds": ref.meta["saved_at"] - start,
                    "cpu_seconds": _interpolate(run.cpu_samples, ref.meta["saved_at"]) if run.cpu_samples else None}
                   for ref in complete_checkpoints(str(run.run_dir / "checkpoints"))]
    return {
        "arm": run.arm.name, "early_exit": run.arm.early_exit, "run_dir": str(run.run_dir),
        "compute_fraction": sum(r["compute_fraction"] * r["steps"] for r in after_warmup) / max(steps, 1),
        "rtd_accuracy": records[-1]["rtd_accuracy"], "final_step": records[-1]["step"],
        "exit_layer_histogram": histogram,
        "curve": [{"seconds": r["time"] - start, "step": r["step"], "loss": r["loss"],
                   "discriminator_loss": r["discriminator_loss"], "generator_loss": r["generator_loss"]}
                  for r in records],
        "checkpoints": checkpoints,
    }


def pick_checkpoints(checkpoints: list[dict], fractions: tuple[float, ...]) -> list[dict]:
    final = checkpoints[-1]["seconds"]
    picked = []
    for fraction in fractions:
        nearest = min(checkpoints, key=lambda c: abs(c["seconds"] - fraction * final))
        if nearest not in picked:
            picked.append(nearest)
    return picked


def scratch_export(summary: dict, out_dir: Path, seed: int) -> str:
    """A randomly initialised discriminator of the same shape: every arm's point at t=0."""
    import torch

    from dsexit.data import save_hf_tokenizer
    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
    from dsexit.model.hf import to_hf_pretraining
    from dsexit.train.checkpoint import open_checkpoint

    ref = open_checkpoint(summary["checkpoints"][-1]["path"])
    torch.manual_seed(seed)
    model = ElectraPreTrainingModel(ElectraExitConfig.from_dict(ref.meta["model_config"]))
    to_hf_pretraining(model).save_pretrained(out_dir)
    save_hf_tokenizer(ref.meta["data_url"], str(out_dir))
    return str(out_dir)


def finetune_models(model_dirs: list[str], task, config, workers: int) -> list[dict]:
    """Every (model, seed) fine-tuning job over `workers` processes; one median summary per model."""
    from dsexit.eval import finetune_many

    total, done = len(model_dirs) * config.seeds, []
    started = time.time()

    def report(model_dir: str, run: dict) -> None:
        done.append(model_dir)
        print(f"  fine-tuned {len(done)}/{total}: {Path(model_dir).parent.name}/{Path(model_dir).name} seed {run['seed']} "
              f"dev {run['dev']['accuracy']:.4f} test {run['test']['accuracy']:.4f} "
              f"({(time.time() - started) / 60:.1f} min)", flush=True)

    results = finetune_many(model_dirs, task, config, workers=workers, on_done=report)
    return [{"median": result["median"], "per_seed": [{k: run[k] for k in ("seed", "dev", "test", "seconds")}
                                                      for run in result["per_seed"]]} for result in results]


# ---------------------------------------------------------------------------------- report
def plot(results: dict, out_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    paths = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        minutes = [p["seconds"] / 60 for p in arm["curve"]]
        axes[0].plot(minutes, [p["loss"] for p in arm["curve"]], label=arm["arm"])
        axes[1].plot(minutes, [p["discriminator_loss"] for p in arm["curve"]], label=arm["arm"])
    axes[0].set(xlabel="pre-train wall clock (min)", ylabel="training loss (exit arms add 50 x exit-head RTD)", title="total loss")
    axes[1].set(xlabel="pre-train wall clock (min)", ylabel="RTD loss", title="discriminator loss")
    axes[0].legend()
    paths.append(_save(figure, out_prefix.with_name(out_prefix.name + "_loss.png")))

    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in arms:
        points = [(0.0, results["scratch"]["median"]["test"]["accuracy"])] + [
            (c["seconds"] / 60, c["finetune"]["median"]["test"]["accuracy"]) for c in arm["evaluated"]]
        axis.plot(*zip(*points), marker="o", label=arm["arm"])
    axis.set(xlabel="pre-train wall clock (min)", ylabel="downstream test accuracy (median of seeds)",
             title=f"{results['task_name']} accuracy vs pre-train time")
    axis.legend()
    paths.append(_save(figure, out_prefix.with_name(out_prefix.name + "_accuracy.png")))

    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        counts = arm["exit_layer_histogram"]
        total = max(sum(counts), 1)
        axis.bar([layer + 1 + (index - len(arms) / 2 + 0.5) * width for layer in range(len(counts))],
                 [count / total for count in counts], width=width, label=arm["arm"])
    axis.set(xlabel="last layer a token ran through", ylabel="fraction of tokens (after exit warmup)",
             title="exit-layer histogram")
    axis.legend()
    paths.append(_save(figure, out_prefix.with_name(out_prefix.name + "_exit_layers.png")))
    return paths


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return str(path)


def format_table(results: dict) -> str:
    header = (f"{'arm':<10} {'compute':>7} {'tokens':>10} {'steps':>6} {'pretrain':>9} {'CPU':>7} {'RTD acc':>7} "
              f"{'dev acc':>7} {'test acc':>8} {'to base dev':>11}")
    lines = [header, "-" * len(header)]
    scratch = results["scratch"]["median"]
    lines.append(f"{'scratch':<10} {'-':>7} {0:>10} {0:>6} {'0.0 min':>9} {'-':>7} {'-':>7} "
                 f"{scratch['dev']['accuracy']:7.4f} {scratch['test']['accuracy']:8.4f} {'-':>11}")
    for arm in results["arms"]:
        final = arm["evaluated"][-1]
        cpu = f"{final['cpu_seconds'] / 60:.1f}m" if final.get("cpu_seconds") is not None else "-"
        reach = arm.get("minutes_to_baseline_dev")
        if arm["arm"] == "baseline":
            reach_text = "-"
        elif not results.get("baseline_beats_scratch", True):
            reach_text = "undefined"
        else:
            reach_text = "not reached" if reach is None else f"{reach:.1f} min"
        lines.append(
            f"{arm['arm']:<10} {arm['compute_fraction']:7.3f} {final['tokens_seen']:>10} {final['step']:>6} "
            f"{final['seconds'] / 60:6.1f} min {cpu:>7} {arm['rtd_accuracy']:7.4f} "
            f"{final['finetune']['median']['dev']['accuracy']:7.4f} {final['finetune']['median']['test']['accuracy']:8.4f} "
            f"{reach_text:>11}")
    return "\n".join(lines)


def compare(results: dict) -> tuple[float, float, str | None]:
    """Fill each arm's time to the baseline's dev accuracy; (time_saved_pct, acc_delta, best arm)."""
    arms = {arm["arm"]: arm for arm in results["arms"]}
    baseline = arms["baseline"]
    base_final = baseline["evaluated"][-1]
    target = base_final["finetune"]["median"]["dev"]["accuracy"]
    base_seconds, base_test = base_final["seconds"], base_final["finetune"]["median"]["test"]["accuracy"]
    scratch = results["scratch"]["median"]
    # Reaching an accuracy the untrained model already has says nothing about pre-training.
    pretraining_helped = target > scratch["dev"]["accuracy"]
    results["baseline_beats_scratch"] = pretraining_helped
    best = None
    for arm in results["arms"]:
        dev_curve = [(0.0, scratch["dev"]["accuracy"])] + [
            (c["seconds"], c["finetune"]["median"]["dev"]["accuracy"]) for c in arm["evaluated"]]
        test_curve = [(0.0, scratch["test"]["accuracy"])] + [
            (c["seconds"], c["finetune"]["median"]["test"]["accuracy"]) for c in arm["evaluated"]]
        reach = time_to_reach(dev_curve, target) if pretraining_helped else None
        arm["minutes_to_baseline_dev"] = None if reach is None else reach / 60
        arm["time_saved_pct"] = None if reach is None else 100.0 * (1.0 - reach / base_seconds)
        arm["test_acc_delta_at_baseline_time"] = _interpolate(test_curve, base_seconds) - base_test
        if not arm["early_exit"]:
            continue
        key = (arm["time_saved_pct"] is not None, arm["time_saved_pct"] or 0.0, arm["test_acc_delta_at_baseline_time"])
        if best is None or key > best[0]:
            best = (key, arm)
    results["baseline_dev_target"] = target
    if best is None:
        return math.nan, math.nan, None
    arm = best[1]
    saved = arm["time_saved_pct"] if arm["time_saved_pct"] is not None else math.nan
    return saved, arm["test_acc_delta_at_baseline_time"], arm["arm"]


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--budget-minutes", type=float, default=60.0,
                        help="wall clock for the whole benchmark; 45%% goes to pre-training")
    parser.add_argument("--pretrain-minutes", type=float, help="per-arm pre-training budget (overrides the split)")
    parser.add_argument("--arms", nargs="+", default=[arm.name for arm in ARMS], choices=[arm.name for arm in ARMS])
    parser.add_argument("--generator", choices=("mlm", "uniform", "unigram"), default="mlm",
                        help="replacement generator of the baseline and early-exit arms (the uniform arm is always "
                             "uniform); uniform learns from the first step, where an MLM generator's ELECTRA first "
                             "spends thousands of steps at the replaced-token prior")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per checkpoint")
    parser.add_argument("--fractions", type=float, nargs="+",
                        help="checkpoints to fine-tune, as fractions of each arm's pre-train time (default: the scale's)")
    parser.add_argument("--max-train-examples", type=int, help="override the scale's fine-tuning train slice")
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    parser.add_argument("--vocab", type=Path, default=SHARED / "tokenizer" / "bert-base-uncased-vocab.txt")
    parser.add_argument("--data-cache", type=Path,
                        help="prepared dataset, made from --corpus once if absent (default: runs/bench_data/corpus-SCALE)")
    parser.add_argument("--task", type=Path, default=SHARED / "downstream" / "rt_sentiment")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_pretrain_vs_exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrain_vs_exit.json")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if "baseline" not in args.arms:
        parser.error("--arms must include baseline (every comparison is against it)")
    if args.generator == "uniform" and "uniform" in args.arms:
        parser.error("--generator uniform makes the uniform arm a copy of the baseline; "
                     "leave it out: --arms baseline exit-0.75 exit-0.50")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    scale = SCALES[args.scale]
    arms = [arm if arm.name == "uniform" else Arm(arm.name, [*arm.flags, "--generator", args.generator], arm.early_exit)
            for arm in ARMS if arm.name in args.arms]
    share = scale["pretrain_share"] * args.budget_minutes
    minutes = args.pretrain_minutes or (share if scale["concurrent"] else share / len(arms))
    from dsexit.eval import FinetuneConfig, load_task

    task = load_task(str(args.task))  # a bad task fails before hours of pre-training
    finetune_options = dict(scale["finetune"])
    if args.max_train_examples:
        finetune_options["max_train_examples"] = args.max_train_examples
    finetune_config = FinetuneConfig(seeds=args.seeds, progress="none", **finetune_options)
    finetune_config.validate()
    data_cache = args.data_cache or REPO / "runs" / "bench_data" / f"corpus-{args.scale}"
    data = prepare_corpus(args.corpus, data_cache, tokenizer_spec(scale, args.vocab), scale["seq_len"])

    runs = pretrain(arms, args.work_dir, scale, data, minutes, args.seed)
    from dsexit.train.distributed import select_accelerator

    select_accelerator()
    import torch

    from dsexit.train.export import export_hf

    if scale["threads"]:  # on a shared CPU, more threads than free cores only spin
        torch.set_num_threads(scale["threads"])

    results = {"scale": args.scale, "generator": args.generator, "budget_minutes": args.budget_minutes,
               "pretrain_minutes_per_arm": minutes,
               "concurrent_arms": scale["concurrent"], "task": str(args.task), "task_name": task.name,
               "finetune": finetune_config.__dict__, "machine": machine_description(), "arms": []}
    summaries = [summarize_run(run, scale["exit_warmup_steps"]) for run in runs]
    model_dirs = [scratch_export(summaries[0], args.work_dir / "scratch-hf", args.seed)]
    for summary in summaries:
        summary["evaluated"] = pick_checkpoints(summary["checkpoints"], tuple(args.fractions or scale["fractions"]))
        for checkpoint in summary["evaluated"]:
            checkpoint["hf_dir"] = str(Path(summary["run_dir"]) / f"hf-step{checkpoint['step']}")
            export_hf(checkpoint["path"], checkpoint["hf_dir"], with_generator=False)
            model_dirs.append(checkpoint["hf_dir"])
    print(f"fine-tuning {len(model_dirs)} models (the untrained one at t=0 first) x {args.seeds} seeds "
          f"on {scale['finetune_workers']} worker(s)", flush=True)
    finetuned = dict(zip(model_dirs, finetune_models(model_dirs, task, finetune_config, scale["finetune_workers"])))
    results["scratch"] = finetuned[model_dirs[0]]
    for summary in summaries:
        for checkpoint in summary["evaluated"]:
            checkpoint["finetune"] = finetuned[checkpoint["hf_dir"]]
            print(f"[{summary['arm']}] step {checkpoint['step']} ({checkpoint['seconds'] / 60:.1f} min): "
                  f"dev {checkpoint['finetune']['median']['dev']['accuracy']:.4f} "
                  f"test {checkpoint['finetune']['median']['test']['accuracy']:.4f}", flush=True)
        results["arms"].append(summary)

    time_saved, acc_delta, best_arm = compare(results)
    results.update(time_saved_pct=time_saved, acc_delta=acc_delta, best_exit_arm=best_arm,
                   benchmark_minutes=(time.time() - started) / 60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, args.out.with_suffix(""))
    args.out.write_text(json.dumps(results, indent=1, default=str))
    table = format_table(results)
    print()
    print(f"pretrain_vs_exit: scale={args.scale}, generator={args.generator}, {minutes:.1f} min pre-training per arm"
          f"{' (arms concurrent)' if scale['concurrent'] else ''}, {task.name} median of {args.seeds} seeds, "
          f"whole benchmark {results['benchmark_minutes']:.1f} min on {results['machine']}")
    print(table)
    print(f"baseline final dev accuracy (target): {results['baseline_dev_target']:.4f}; 'to base dev' = pre-train "
          f"wall clock to reach it (interpolated); compute = executed token-layers / full, after exit warmup")
    if not results["baseline_beats_scratch"]:
        print("the baseline's dev accuracy does not beat the untrained model's: time to reach it is undefined (nan)")
    reached = any(arm.get("time_saved_pct") is not None for arm in results["arms"] if arm["early_exit"])
    print(f"best early-exit arm: {best_arm}{'' if reached else ' (none reached the target: chosen by acc_delta)'}; plots: {', '.join(results['plots'])}; json: {args.out}")
    print(f"RESULT pretrain_vs_exit time_saved_pct={time_saved:.1f} acc_delta={acc_delta:+.4f}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
