"""PNG plots of a run from RUN_DIR/metrics.jsonl (matplotlib, Agg backend; no display needed).

losses.png        generator and discriminator loss, RTD accuracy
compute.png       fraction of token-layers executed, and the exit threshold tau
exit_layers.png   how many tokens left after each layer (whole run, and the last interval)
heldout.png       held-out RTD loss (uniform and generator corruption, full depth and under
                  the exit rule) and MLM loss, with the trivial baselines as dashed lines
"""

from __future__ import annotations

import os

from dsexit.train.metrics import read_metrics


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed; install it with: pip install 'dsexit[plot]'."
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl records to plot.")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [record["step"] for record in records]
    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        path = os.path.join(out_dir, name)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    figure, (generator_axis, discriminator_axis, accuracy_axis) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    generator_axis.plot(steps, [r["generator_loss"] for r in records])
    generator_axis.set_ylabel("generator MLM loss")
    discriminator_axis.plot(steps, [r["discriminator_loss"] for r in records], color="tab:orange")
    discriminator_axis.set_ylabel("discriminator RTD loss")
    accuracy_axis.plot(steps, [r["rtd_accuracy"] for r in records], color="tab:green")
    accuracy_axis.set_ylabel("RTD accuracy")
    accuracy_axis.set_xlabel("step")
    save(figure, "losses.png")

    figure, compute_axis = plt.subplots(figsize=(7, 4))
    compute_axis.plot(steps, [r["compute_fraction"] for r in records], label="compute fraction executed")
    compute_axis.set_ylim(0, 1.05)
    compute_axis.set_xlabel("step")
    compute_axis.set_ylabel("token-layers executed / full")
    tau_axis = compute_axis.twinx()
    tau_axis.plot(
        steps,
        [r["exit_threshold"] if r["exit_threshold"] is not None else float("nan") for r in records],
        color="tab:red",
        linestyle="--",
        label="tau",
    )
    tau_axis.set_ylabel("exit threshold tau")
    figure.legend(loc="upper right", bbox_to_anchor=(0.88, 0.95))
    save(figure, "compute.png")

    layers = list(range(1, len(records[-1]["exit_layer_counts"]) + 1))
    whole_run = [sum(r["exit_layer_counts"][i] for r in records) for i in range(len(layers))]
    total, last = max(1, sum(whole_run)), records[-1]["exit_layer_counts"]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.4
    axis.bar([layer - width / 2 for layer in layers], [count / total for count in whole_run], width, label="whole run")
    axis.bar(
        [layer + width / 2 for layer in layers],
        [count / max(1, sum(last)) for count in last],
        width,
        label=f"last interval (step {steps[-1]})",
    )
    axis.set_xlabel("exit layer (last layer executed)")
    axis.set_ylabel("fraction of tokens")
    axis.set_xticks(layers)
    axis.legend()
    save(figure, "exit_layers.png")

    evals = read_metrics(run_dir, "eval")
    if evals:
        eval_steps = [record["step"] for record in evals]
        figure, (rtd_axis, mlm_axis) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        for key, label in (
            ("eval_rtd_loss_uniform", "uniform corruption, full depth"),
            ("eval_rtd_loss_uniform_exit", "uniform corruption, exit rule"),
            ("eval_rtd_loss_generator", "run's generator, full depth"),
        ):
            rtd_axis.plot(eval_steps, [record[key] for record in evals], marker=".", label=label)
        rtd_axis.axhline(
            evals[-1]["rtd_prior_entropy"], color="gray", linestyle="--", label="replaced-token prior entropy"
        )
        rtd_axis.set_ylabel("held-out RTD loss")
        rtd_axis.legend(fontsize=8)
        mlm_axis.plot(eval_steps, [record["eval_mlm_loss"] for record in evals], marker=".", label="generator MLM loss")
        mlm_axis.axhline(evals[-1]["unigram_entropy"], color="gray", linestyle="--", label="unigram cross-entropy")
        mlm_axis.set_ylabel("held-out MLM loss")
        mlm_axis.set_xlabel("step")
        mlm_axis.legend(fontsize=8)
        save(figure, "heldout.png")
    return written
