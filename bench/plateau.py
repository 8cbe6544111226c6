"""Can an MLM generator's discriminator leave the replaced-token prior within the quick budget?

At the quick scale (bench/pretrain_vs_exit.py: 6 x 128 discriminator, 2 x 32 generator,
SentencePiece 8192, 64-token samples, 2-core CPU) an MLM generator sits at the unigram
distribution and its discriminator at the replaced-token prior for the whole budget. This
benchmark time-boxes recipe variants against the plain recipe, side by side (two runs at a
time, one thread each, equal training minutes, no exits), on the trainer's held-out metrics:

    plain          the quick recipe (lr 1e-3, warmup 100)
    mix-anneal     half the replacements uniform at step 0, falling linearly to none at step 600
    temperature-2  replacements sampled from softmax(logits / 2)
    temperature-3  the same at 3
    electra-lr     ELECTRA-Small's settings: lr 5e-4, long warmup (500 steps)
    t2-electra-lr  both
    small-gen      a generator of hidden 16 (1/8 of the discriminator)

A variant "learns" when, at the end of its budget, its generator has reached the unigram plateau
(held-out MLM loss within 0.15 of the unigram cross-entropy: before that, every recipe's
discriminator dips below the prior while the generator is still weak, and returns to it when the
generator reaches the plateau), its held-out RTD loss under uniform corruption is below the
prior's entropy by 0.02, and its ROC-AUC on its own generator's corruption (sampled at its
temperature) is at least 0.6. The last line is

    RESULT plateau learns=<variants that learn, or none> plain_auc_generator=X best_auc_generator=X
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_vs_exit import (
    REPO,
    RESULTS,
    SCALES,
    SHARED,
    Arm,
    Run,
    machine_description,  # noqa: E402
    prepare_corpus,
    pretrain_all,
    summarize_run,
    tokenizer_spec,
)

VARIANTS = [
    Arm("plain", [], False),
    Arm("mix-anneal", ["--replacement-mix", "0.5", "--replacement-mix-steps", "600"], False),
    Arm("temperature-2", ["--generator-temperature", "2.0"], False),
    Arm("electra-lr", ["--lr", "5e-4", "--warmup-steps", "500"], False),
    Arm("small-gen", ["--model-set", "generator_hidden_size=16"], False),
    Arm("temperature-3", ["--generator-temperature", "3.0"], False),
    Arm("t2-electra-lr", ["--generator-temperature", "2.0", "--lr", "5e-4", "--warmup-steps", "500"], False),
]


def learns(final: dict) -> bool:
    return (
        final["eval_mlm_loss"] <= final["unigram_entropy"] + 0.15
        and final["eval_rtd_loss_uniform"] <= final["rtd_prior_entropy"] - 0.02
        and final["eval_rtd_auc_generator"] >= 0.6
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.5, help="training minutes per variant")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=[v.name for v in VARIANTS])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=RESULTS / "plateau.json")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_plateau")
    args = parser.parse_args(argv)
    started = time.time()
    scale = {**SCALES["quick"], "minutes": args.minutes, "eval_interval": 100}
    data = prepare_corpus(
        SHARED / "corpus",
        None,
        REPO / "runs" / "bench_data" / "quick-heldout",
        tokenizer_spec(scale, SHARED / "tokenizer"),
        scale["seq_len"],
    )
    work = args.work_dir
    # Later flags win over the scale's (--lr, --warmup-steps): the variant's own settings apply.
    runs = [
        Run(Arm(v.name, ["--no-exit", *v.flags], False), args.seed, work / v.name)
        for v in VARIANTS
        if v.name in args.variants
    ]
    pretrain_all(runs, scale, data, "mlm")
    summaries = [summarize_run(run) for run in runs]
    rows = []
    for summary in summaries:
        final = summary["final"]
        first = summary["curve"][0]
        rows.append(
            {
                "variant": summary["arm"],
                "steps": summary["final_step"],
                "minutes": summary["train_minutes"],
                "learns": learns(final),
                **{
                    k: final[k]
                    for k in (
                        "eval_rtd_loss_uniform",
                        "eval_rtd_auc_uniform",
                        "eval_rtd_loss_generator",
                        "eval_rtd_auc_generator",
                        "eval_mlm_loss",
                        "eval_mlm_accuracy",
                        "rtd_prior_entropy",
                        "unigram_entropy",
                    )
                },
                "start_rtd_loss_uniform": first["rtd_loss_uniform"],
                "curve": summary["curve"],
            }
        )
    header = (
        f"{'variant':<14} {'steps':>6} {'RTD unif':>8} {'prior':>6} {'AUC unif':>8} {'RTD gen':>8} "
        f"{'AUC gen':>7} {'MLM':>6} {'unigram':>7} {'learns':>6}"
    )
    print()
    print(
        f"plateau: MLM generator, quick scale, {args.minutes:.1f} training minutes per variant, 2 at a time, "
        f"on {machine_description()} ({(time.time() - started) / 60:.1f} min in all)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['variant']:<14} {row['steps']:>6} {row['eval_rtd_loss_uniform']:8.4f} "
            f"{row['rtd_prior_entropy']:6.4f} "
            f"{row['eval_rtd_auc_uniform']:8.4f} {row['eval_rtd_loss_generator']:8.4f} "
            f"{row['eval_rtd_auc_generator']:7.4f} {row['eval_mlm_loss']:6.3f} {row['unigram_entropy']:7.3f} "
            f"{'yes' if row['learns'] else 'no':>6}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"minutes": args.minutes, "machine": machine_description(), "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    winners = [row["variant"] for row in rows if row["learns"]]
    plain = next((row for row in rows if row["variant"] == "plain"), rows[0])
    best = max(rows, key=lambda row: row["eval_rtd_auc_generator"])
    print(f"plot: {args.out.with_suffix('.png')}; json: {args.out}")
    print(
        f"RESULT plateau learns={','.join(winners) or 'none'} "
        f"plain_auc_generator={plain['eval_rtd_auc_generator']:.4f} "
        f"best_auc_generator={best['eval_rtd_auc_generator']:.4f} best={best['variant']}"
    )
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, mlm_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        minutes = [point["minutes"] for point in row["curve"]]
        loss_axis.plot(minutes, [point["rtd_loss_generator"] for point in row["curve"]], label=row["variant"])
        mlm_axis.plot(minutes, [point["mlm_loss"] for point in row["curve"]], label=row["variant"])
    loss_axis.axhline(rows[0]["rtd_prior_entropy"], color="gray", linestyle="--", label="prior (uniform corruption)")
    mlm_axis.axhline(rows[0]["unigram_entropy"], color="gray", linestyle="--", label="unigram cross-entropy")
    loss_axis.set(xlabel="training minutes", ylabel="held-out RTD loss, own generator's corruption")
    mlm_axis.set(xlabel="training minutes", ylabel="held-out generator MLM loss", ylim=(None, 9.5))
    loss_axis.legend(fontsize=8)
    mlm_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
