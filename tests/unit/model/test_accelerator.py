"""The model on an accelerator (CUDA) equals the model on the CPU and Hugging Face's ELECTRA there.

These run where an accelerator is present (`bench/device_check.sh` runs them on a GPU machine);
a CPU-only machine has nothing to compare and reports them as skipped with that reason.
"""

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.hf import to_hf_masked_lm, to_hf_pretraining

from .conftest import VOCAB, make_batch

ACCELERATORS = ["cuda"] if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not ACCELERATORS, reason="no CUDA device on this machine")
TOLERANCE = 1e-4  # fp32 on different kernels (cuBLAS vs oneDNN) and summation orders


def _model(preset: str = "electra-tiny", seed: int = 1, **overrides) -> ElectraPreTrainingModel:
    torch.manual_seed(seed)
    config = ElectraExitConfig.from_preset(
        preset, vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides
    )
    model = ElectraPreTrainingModel(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms; spread the heads' confidences
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
            if "exit_heads" in name and name.endswith("dense_prediction.weight"):
                parameter.mul_(300)
    return model


def _on(device, tensors):
    return tuple(tensor.to(device) for tensor in tensors)


@pytest.fixture(params=ACCELERATORS or ["none"])
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("preset", ["electra-tiny", "electra-small"])
def test_exits_off_equal_hf_on_the_device(device, preset):
    model = _model(preset).to(device)
    hf_discriminator, hf_generator = to_hf_pretraining(model).to(device), to_hf_masked_lm(model).to(device)
    input_ids, attention_mask, token_type_ids = _on(device, make_batch(4, 48, pad_tail=True, seed=3))
    with torch.no_grad():
        ours = model.discriminator(input_ids, attention_mask, token_type_ids).logits
        theirs = hf_discriminator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        ours_generator = model.generator(model.embeddings, input_ids, attention_mask, token_type_ids)
        theirs_generator = hf_generator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
    assert ours.device.type == device.type
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert (ours_generator - theirs_generator).abs().max() <= TOLERANCE


@pytest.mark.parametrize("exit_kv", ["keep", "drop"])
def test_forced_exits_route_the_same_on_the_device_as_on_the_cpu(device, exit_kv):
    cpu_model = _model(exit_enabled=True, min_exit_layer=1, exit_kv=exit_kv)
    device_model = _model(exit_enabled=True, min_exit_layer=1, exit_kv=exit_kv).to(device)
    batch = make_batch(4, 32, pad_tail=True, seed=5)
    plan = torch.randint(1, 5, batch[0].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on_cpu = cpu_model.discriminator(*batch, decision=_plan_decision(cpu_model, plan))
        on_device = device_model.discriminator(
            *_on(device, batch), decision=_plan_decision(device_model, plan.to(device))
        )
    real = batch[1].bool()
    assert torch.equal(on_device.exit_layer.cpu()[real], on_cpu.exit_layer[real])
    assert (on_device.logits.cpu()[real] - on_cpu.logits[real]).abs().max() <= TOLERANCE
    assert [work.rows for work in on_device.work] == [work.rows for work in on_cpu.work]


def _plan_decision(model, plan):
    from dsexit.model import ExitDecision

    return ExitDecision.for_config(model.config, plan=plan)


def test_threshold_exits_and_the_training_step_on_the_device(device):
    """A confidence threshold picks the same tokens on both; a bf16 training step is finite and reaches every
    parameter, and its loss is close to the fp32 one on the CPU."""
    torch.manual_seed(0)
    cpu_model = _model(exit_enabled=True, min_exit_layer=1).train()
    device_model = _model(exit_enabled=True, min_exit_layer=1).to(device).train()
    batch = make_batch(8, 64, seed=7)
    torch.manual_seed(11)
    on_cpu = cpu_model(*batch, exit_threshold=0.9)
    torch.manual_seed(11)
    torch.cuda.manual_seed(11)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        on_device = device_model(*_on(device, batch), exit_threshold=0.9)
    on_device.loss.backward()
    assert 0.0 < on_device.compute_fraction < 1.0
    assert torch.isfinite(on_device.loss)
    for name, parameter in device_model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # the corruption draws differ between CPU and CUDA generators; the losses are of the same size
    assert abs(float(on_device.loss.detach()) - float(on_cpu.loss.detach())) <= 0.25 * float(on_cpu.loss.detach())


def test_a_training_step_of_the_loop_synchronises_nothing(device, monkeypatch):
    """One step of the trainer's loop (a one-rank DeepSpeed ZeRO-2 engine, the step runner and its
    statistics) under `torch.cuda.set_sync_debug_mode("error")`: no operation in forward, backward,
    optimizer step or statistics waits for the device. The step's one read (`StepStats.reduce`)
    comes after it."""
    import deepspeed

    from dsexit.train.config import TrainConfig
    from dsexit.train.config.ds_config import find_ds_config, load_ds_config, resolve_ds_config
    from dsexit.train.engine import build_engine, build_model
    from dsexit.train.step_runner import DataParallelSteps
    from dsexit.train.step_stats import StepStats

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(29500 + torch.randint(0, 1000, ()).item()))
    deepspeed.init_distributed()
    config = TrainConfig.from_dict({"training": {"global_batch_size": 16, "micro_batch_size": 8, "precision": "bf16"}})
    ds_config = resolve_ds_config(
        load_ds_config(find_ds_config("ds_configs/zero2.json")), config, dp_size=1, total_steps=100, monitor_dir="/tmp"
    )
    model_config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)
    engine = build_engine(build_model(model_config, seed=0), ds_config)

    def batches():
        seed = 0
        while True:
            input_ids, attention_mask, token_type_ids = make_batch(8, 64, seed=seed)
            yield {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            seed += 1

    runner = DataParallelSteps(engine, batches(), 2, device, lambda: 1e-4)
    runner.run(None, None, StepStats(model_config.num_hidden_layers))  # warm-up: allocations, first launches
    stats = StepStats(model_config.num_hidden_layers)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.run(None, None, stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    summary = stats.reduce(preempted=False, time_limit=False, device=device)
    assert summary.real_tokens == 2 * 8 * 64 and summary.loss == summary.loss and summary.compute_fraction == 1.0
