"""bench/train_exit.py: the measured ideal's arithmetic, the layer FLOPs it uses, the layer clock's hooks."""

import argparse

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.flops import embedding_and_generator_flops
from tests.helpers import load_bench

bench = load_bench("train_exit")


def _arm(name, target, seconds, layer_seconds, flops, layer_flops):
    arm = bench.Arm(name, {}, target)
    arm.seconds, arm.layer_seconds = [seconds] * 3, [layer_seconds] * 3
    arm.flops, arm.layer_flops, arm.compute, arm.threads = [flops] * 3, [layer_flops] * 3, [1.0] * 3, 2
    return arm


def test_measured_ideal_keeps_the_plain_rest_and_scales_the_plain_layers_by_layer_flops(capsys):
    # Plain: 1.5 s, of which layers 1.0 s for 800 of 1000 FLOPs. The exit arm runs half the layer
    # FLOPs: attainable 0.5 + 1.0 / 2 = 1.0 s, i.e. 1.5x; the FLOP ideal promises 1000 / 600.
    plain = _arm("plain", None, 1.5, 1.0, 1000, 800)
    exiting = _arm("linear@0.50", 0.5, 1.2, 0.7, 600, 400)
    args = argparse.Namespace(preset="p", batch=1, accumulation=1, seq_len=8, launches=1, steps=3, settle=0)
    peaks = {"bf16": 4e3, "fp32": 1e3}
    results = bench.summarize([plain, exiting, _arm("linear@0.75", 0.75, 1.3, 0.8, 800, 600)], args, "fp32", peaks)
    row = results["arms"]["linear@0.50"]
    assert row["speedup"] == pytest.approx(1.25)
    assert row["ideal_speedup"] == pytest.approx(1000 / 600)
    assert row["measured_ideal_speedup"] == pytest.approx(1.5)
    assert row["measured_efficiency"] == pytest.approx(1.25 / 1.5)
    assert row["layer_efficiency"] == pytest.approx(0.5 / 0.7)
    assert results["arms"]["plain"]["measured_ideal_speedup"] == pytest.approx(1.0)
    assert results["plain_layer_flops_per_s"] == pytest.approx(800)
    # Plain: 1000 FLOPs in 1.5 s, against each precision's peak; the headline share is the arms' precision's.
    assert results["peak_shares"] == pytest.approx({"bf16": 1000 / 1.5 / 4e3, "fp32": 1000 / 1.5 / 1e3})
    assert results["peak_share"] == pytest.approx(1000 / 1.5 / 1e3)
    assert results["plain_rest_flops_per_s"] == pytest.approx(200 / 0.5)
    bench.print_table(results)  # the assumption's check: each exit arm's rest (0.5 s both) beside plain's
    assert "it took 0.500-0.500 s per step in the exit arms, 0.500 in plain" in capsys.readouterr().out


class _Engine:
    """What `LayerClock` reads of a DeepSpeed engine: `.module` and `.backward`."""

    def __init__(self, module):
        self.module = module

    def backward(self, loss):
        loss.backward()


def test_the_step_has_the_shape_of_the_training_preset_that_trains_the_model():
    from dsexit.train.config import preset_config

    for model_preset, training_preset in (("electra-small", "small"), ("electra-tiny", "smoke")):
        training = preset_config(training_preset).training
        args = bench.parse_args(["--preset", model_preset])
        assert (args.batch, args.batch * args.accumulation) == (training.micro_batch_size, training.global_batch_size)
        ds_config = bench.resolved_ds_config(args)
        assert ds_config["train_micro_batch_size_per_gpu"] == training.micro_batch_size
        assert ds_config["train_batch_size"] == training.global_batch_size
    # A batch given is one micro-batch per step unless told otherwise.
    assert (bench.parse_args(["--batch", "32"]).accumulation, bench.parse_args([]).batch) == (1, 128)
    with pytest.raises(SystemExit, match="no training preset"):
        bench.training_preset_batch("electra-large")


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_layer_flops_are_the_training_flops_less_the_embedding_and_generator_part(exit_kv):
    torch.manual_seed(0)
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=300, exit_kv=exit_kv)
    model = ElectraPreTrainingModel(config).train()
    input_ids = torch.randint(120, 300, (4, 24))
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    engine = _Engine(model)
    clock = bench.LayerClock(engine)
    output = model(input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids), exit_threshold=0.3)
    assert 0.0 < output.compute_fraction < 1.0  # tokens exited: the routed layers count their rows
    assert clock.seconds > 0.0  # the forward's interval, from layer 1's input to the last layer's output
    forward_only = clock.seconds
    engine.backward(output.loss)
    assert clock.seconds > forward_only  # and the backward's, up to the gradient at layer 1's input
    assert clock.take() > 0.0 and clock.seconds == 0.0
    rest = 3 * embedding_and_generator_flops(output.compute_log, config)
    assert bench.layer_training_flops(output, config) == output.flops.training_flops - rest


def test_arms_of_each_routing_get_their_own_name_row_and_best_variant():
    assert bench.arm_name("dense", 0.75, "threshold") == "dense@0.75"
    arm = bench.arm_named(bench.arm_name("linear", 0.5, "capacity"))
    assert (arm.name, arm.target, arm.routing, arm.overrides) == (
        "linear@0.50:capacity",
        0.5,
        "capacity",
        {"exit_head": "linear"},
    )
    assert bench.arm_named("dense@0.75").routing == "threshold"
    arms = [_arm("plain", None, 1.5, 1.0, 1000, 800)]
    for routing, seconds in (("threshold", 1.3), ("capacity", 1.2)):
        for target in (1.0, 0.75, 0.5):
            arm = _arm(bench.arm_name("dense", target, routing), target, seconds, 0.7, 800, 600)
            arm.routing = routing
            arms.append(arm)
    args = argparse.Namespace(preset="p", batch=1, accumulation=1, seq_len=8, launches=1, steps=3, settle=0)
    results = bench.summarize(arms, args, "fp32", {"bf16": 4e3, "fp32": 1e3})
    assert results["best_by_routing"] == {"threshold": "dense", "capacity": "dense"}
    assert results["arms"]["dense@0.75:capacity"]["routing"] == "capacity"
    assert results["arms"]["plain"]["routing"] is None


def test_without_a_layer_clock_the_measured_ideal_is_left_out_and_each_variant_gets_a_result_line(capsys):
    """Compiled, or on a GPU, no hook times the layers: speedups and FLOP ideals stand alone."""
    nan = float("nan")
    arms = [_arm("plain", None, 1.0, nan, 1000, 800)]
    for variant, (at75, at50) in {"dense": (0.9, 0.7), "dense-drop": (0.8, 0.6)}.items():
        for target, seconds, flops in ((0.75, at75, 800), (0.5, at50, 600)):
            arm = _arm(f"{variant}@{target:.2f}:capacity", target, seconds, nan, flops, flops - 200)
            arm.routing = "capacity"
            arms.append(arm)
    args = argparse.Namespace(
        preset="p", batch=1, accumulation=1, seq_len=8, launches=1, steps=3, settle=0, compile=True
    )
    results = bench.summarize(arms, args, "bf16", {"bf16": 4e3, "fp32": 1e3})
    row = results["arms"]["dense-drop@0.50:capacity"]
    assert row["speedup"] == pytest.approx(1 / 0.6) and row["measured_efficiency"] is None
    assert results["best_by_routing"] == {"capacity": "dense-drop"} and not results["layer_clock"]
    lines = bench.result_lines(results)
    assert [line.split("variant=")[1].split()[0] for line in lines] == ["dense-drop", "dense"]
    assert "routing=capacity exit_kv=drop compiled=yes device=" in lines[0]
    assert "exit_kv=keep" in lines[1] and "measured_efficiency" not in lines[1]
    bench.print_table(results)
    assert "no layer clock" in capsys.readouterr().out


def test_a_fixed_capacity_arm_runs_at_its_targets_level_from_the_first_step():
    arm = bench.Arm("dense@0.50:capacity", {}, 0.5, "capacity")
    assert bench.capacity_level(arm, fixed=True) == 8  # level k plans about k/16 of the full depth
    assert bench.capacity_level(bench.Arm("dense@0.75:capacity", {}, 0.75, "capacity"), fixed=True) == 12
    assert bench.capacity_level(bench.Arm("dense@1.00:capacity", {}, 1.0, "capacity"), fixed=True) == 16
    assert bench.capacity_level(bench.Arm("dense@0.50", {}, 0.5), fixed=True) is None  # threshold routing
    with pytest.raises(SystemExit):
        bench.parse_args(["--targets", "0.5"])
    assert bench.parse_args(["--compile", "--batch", "4"]).fixed_capacity
