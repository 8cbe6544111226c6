"""`--compile on`: the trainer's real loop (deepspeed launcher, 2 ranks, ZeRO-2) with the model
compiled in place, fullgraph and static shapes. The reference is the same run eager: with dropout
off the two compute the same steps, so their losses agree; checkpoints keep the model's own names;
once exits start the forward runs eagerly and the run goes on."""

from __future__ import annotations

import torch

from dsexit.train.export import load_weights_only

from .helpers import ZERO2_ARGS, launch

NO_DROPOUT = ["--model-set", "hidden_dropout_prob=0.0", "--model-set", "attention_probs_dropout_prob=0.0"]
# Exits start at step 7: twelve compiled micro-batches first, more than dynamo's recompile limit (8), so
# anything that changed per call and recompiled would fail the run under fullgraph=True.
ARGS = [
    *ZERO2_ARGS,
    *NO_DROPOUT,
    *("--max-steps", "8", "--save-interval", "8", "--eval-interval", "0", "--no-export-hf"),
    *("--exit-warmup-steps", "6"),
    *(
        "--exit-routing",
        "threshold",
    ),  # threshold exits run eagerly once they start (capacity's compile: test_capacity_routing)
]


def test_compiled_training_equals_eager_and_keeps_parameter_names(tmp_path):
    # aot_eager traces the graph as inductor would (fullgraph, dynamic=False) without generating code,
    # which a CPU test cannot afford; the exit warm-up ends inside the run.
    compiled = launch("deepspeed", tmp_path / "compiled", [*ARGS, "--compile", "on", "--compile-backend", "aot_eager"])
    eager = launch("deepspeed", tmp_path / "eager", [*ARGS, "--compile", "off"])
    compiled.check(), eager.check()
    assert "compiling the training forward" in compiled.output and "first step, compilation included" in compiled.output
    assert "exits started: the forward runs eagerly" in compiled.output
    assert "eager forward (--compile off); CPU kernels" in eager.output  # the CPU set-up's, not compiled
    steps = sorted(eager.metrics)
    assert steps == sorted(compiled.metrics) == list(range(1, 9))
    for step in steps:
        for name in ("loss", "generator_loss", "discriminator_loss", "compute_fraction"):
            assert abs(compiled.metrics[step][name] - eager.metrics[step][name]) <= 1e-3 * max(
                1.0, abs(eager.metrics[step][name])
            ), (step, name)
        assert compiled.metrics[step]["samples_digest"] == eager.metrics[step]["samples_digest"]

    def module_names(run) -> set[str]:
        return set(load_weights_only(str(run.checkpoints / "global_step8" / "mp_rank_00_model_states.pt"))["module"])

    names = module_names(compiled)
    assert names == module_names(eager)
    assert not any("_orig_mod" in name for name in names)
    assert any(name.startswith("discriminator.electra.encoder.layer.0.") for name in names)
    assert torch.isfinite(torch.tensor([record["loss"] for record in compiled.metrics.values()])).all()


def test_capacity_routing_stays_compiled_as_the_level_changes_and_equals_eager(tmp_path):
    """Capacity routing has static shapes: the run goes from its warm-up through full depth to the levels
    the controller picks, compiled the whole way (a recompile past dynamo's limit would fail it under
    fullgraph), and computes what the same run computes eagerly."""
    capacity = [*ARGS, "--max-steps", "12", "--save-interval", "12", "--exit-warmup-steps", "4"]
    capacity += ["--exit-routing", "capacity", "--target-compute", "0.5", "--capacity-interval", "2"]
    capacity += ["--min-confidence", "0"]  # untrained heads: the target alone sets the level
    compiled = launch(
        "deepspeed", tmp_path / "compiled", [*capacity, "--compile", "on", "--compile-backend", "aot_eager"]
    )
    eager = launch("deepspeed", tmp_path / "eager", [*capacity, "--compile", "off"])
    compiled.check(), eager.check()
    assert "one graph per capacity level" in compiled.output
    assert "runs eagerly" not in compiled.output
    levels = [compiled.metrics[step]["capacity_level"] for step in sorted(compiled.metrics)]
    assert levels[:6] == [None] * 4 + [16, 16]  # warm-up, then full depth for the first window
    assert min(levels[6:]) < 16 and compiled.metrics[12]["compute_fraction"] < 0.75
    for step in sorted(eager.metrics):
        assert compiled.metrics[step]["capacity_level"] == eager.metrics[step]["capacity_level"]
        for name in ("loss", "compute_fraction", "forced_exit_share"):
            assert abs(compiled.metrics[step][name] - eager.metrics[step][name]) <= 1e-3 * max(
                1.0, abs(eager.metrics[step][name])
            ), (step, name)
