"""Worker for the pipeline tests: run under `torchrun --nproc_per_node 2` (2 stages, dp 1).

Builds the same weights as the data-parallel model, runs `train_batch` on fixed data, and
writes what each stage observed to OUT_DIR/rank{r}.json. Mode `grads:KV:ZERO` instead trains
the pipeline and the data-parallel model side by side for several steps with gradient clipping
active and plain SGD at lr 1, so that each step's parameter change is the clipped gradient, and
records how far the two differ.
"""

import json
import os
import sys

import deepspeed
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel, ExitDecision
from dsexit.model.exit_rules.confidence import margin_from
from dsexit.parallel.pipeline import build_pipeline_module, micro_batch_inputs, pipeline_state_dict_to_model
from dsexit.train.cluster.distributed import release_shm_workspace


def batches(config, micro_batches, batch_size=4, seq_len=32, exit_plans=None):
    generator = torch.Generator().manual_seed(7)
    for index in range(micro_batches):
        input_ids = torch.randint(200, config.vocab_size, (batch_size, seq_len), generator=generator)
        input_ids[:, 0] = config.cls_token_id
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, seq_len - 5 :] = 0
        input_ids[0, seq_len - 5 :] = config.pad_token_id
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),
        }
        yield batch, (exit_plans[index] if exit_plans else None)


def feed(config, micro_batches, exit_plans=None, exit_threshold=None):
    return iter(
        [
            micro_batch_inputs(batch, config, exit_threshold, None, plan)
            for batch, plan in batches(config, micro_batches, exit_plans=exit_plans)
        ]
    )


def main():
    out_dir, mode = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_workspace()
    rank = torch.distributed.get_rank()
    if mode.startswith("grads:"):
        _, exit_kv, zero_stage = mode.split(":")
        return compare_gradients(out_dir, rank, exit_kv, int(zero_stage))
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    micro_batches = 4
    plans = None
    if mode == "exits":
        # Micro-batches 1 and 3: every token leaves after layer 1 (stage 1 holds layers 1-2).
        plans = []
        for index in range(micro_batches):
            plan = torch.full((4, 32), config.num_hidden_layers + 1, dtype=torch.long)
            plan[:, ::3] = 1 if index % 2 == 0 else plan[:, ::3]
            plans.append(torch.ones_like(plan) if index % 2 == 1 else plan)
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config)
    reference_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    module = build_pipeline_module(config, num_stages=2, model=model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 1 if mode != "zero0" else 0},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=module, config=ds_config, model_parameters=[p for p in module.parameters()]
    )
    stage_counters = module.stage_counters
    torch.manual_seed(123)
    losses = []
    counters = []
    steps = 3 if mode != "reference" else 1
    for _ in range(steps):
        stage_counters.reset()
        losses.append(float(engine.train_batch(feed(config, micro_batches, exit_plans=plans))))
        counters.append(dict(vars(stage_counters)))
    # The data-parallel path on the same weights, data and RNG seed, for the first step.
    torch.manual_seed(0)
    reference = ElectraPreTrainingModel(config)
    reference.load_state_dict(reference_state)
    torch.manual_seed(123)
    reference_losses = []
    for batch, plan in batches(config, micro_batches, exit_plans=plans):
        output = reference(
            **batch, exit_plan=plan if plan is not None and (plan <= config.num_hidden_layers).any() else None
        )
        reference_losses.append(float(output.loss))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(
            {
                "losses": losses,
                "counters": counters,
                "stage": engine.stage_id,
                "reference_first_loss": sum(reference_losses) / len(reference_losses),
            },
            handle,
        )


GRAD_CLIP = 0.5
STEPS = 3
MICRO_BATCHES = 4


def median_first_head_confidence(model, config) -> float:
    """The median prior-margin confidence (this config's rule) of the first exit head over the real tokens of the
    uncorrupted batches: as a threshold, about half the tokens leave after layer 1 and the others run on."""
    discriminator = model.discriminator
    margins = []
    with torch.no_grad():
        for batch, _ in batches(config, MICRO_BATCHES):
            state = discriminator.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            state = discriminator.run_layer(1, state, ExitDecision())  # no exit: every state after layer 1
            logits = discriminator.head_for(1)(state.hidden).float()
            margins.append(margin_from(logits, config.prior_logit)[state.attention_mask])
    return float(torch.cat(margins).median())


def step_settings(config, step: int, first_tau: float):
    """(exit plans, tau) of step `step`: first a threshold (`first_tau`) under which tokens leave at
    different heads on both stages, pinned specials with their sequence's last token; then random
    forced exit layers with one micro-batch leaving whole."""
    if step == 0:
        return None, first_tau
    generator = torch.Generator().manual_seed(100 + step)
    plans = [torch.randint(1, config.num_hidden_layers + 2, (4, 32), generator=generator) for _ in range(MICRO_BATCHES)]
    plans[1] = torch.ones_like(plans[1])  # skips stage 2 (it holds layers 3-4)
    return plans, None


def local_parameters(module, config) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters under the data-parallel model's names."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, parameter in module.named_parameters():
        index, rest = name.split(".", 1)
        by_layer.setdefault(int(index), {})[rest] = parameter
    return pipeline_state_dict_to_model(by_layer, config)


def compare_gradients(out_dir: str, rank: int, exit_kv: str, zero_stage: int) -> None:
    config = ElectraExitConfig.from_preset(
        "electra-tiny", vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, exit_kv=exit_kv
    )
    torch.manual_seed(0)
    model = ElectraPreTrainingModel(config)
    reference = ElectraPreTrainingModel(config)
    reference.load_state_dict(model.state_dict())
    first_tau = median_first_head_confidence(reference, config)
    module = build_pipeline_module(config, num_stages=2, model=model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "gradient_clipping": GRAD_CLIP,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, optimizer=optimizer)
    mine = local_parameters(engine.module, config)
    reference_parameters = dict(reference.named_parameters())
    # How often a gradient reaches the stage's first layer: once per micro-batch that ran it, however
    # many float tensors the stage sends on.
    first_layer = next(layer for layer in engine.module.forward_funcs if hasattr(layer, "layer_number")).layer
    forward_passes, accumulations = [], []
    first_layer.register_forward_hook(lambda _module, _inputs, _output: forward_passes.append(1))

    def count_gradient(gradient):
        # Also called, with None, where a backward pass reaches the weight without a gradient.
        if gradient is not None:
            accumulations.append(1)

    first_layer.output.dense.weight.register_hook(count_gradient)
    steps = []
    for step in range(STEPS):
        plans, tau = step_settings(config, step, first_tau)
        before = {name: parameter.detach().clone() for name, parameter in mine.items()}
        accumulations.clear()
        forward_passes.clear()
        reference_before = {name: reference_parameters[name].detach().clone() for name in mine}
        torch.manual_seed(1000 + step)
        loss = float(engine.train_batch(feed(config, MICRO_BATCHES, exit_plans=plans, exit_threshold=tau)))
        # The data-parallel model on the same batch and RNG: mean loss over micro-batches, clip, SGD at lr 1.
        torch.manual_seed(1000 + step)
        reference.zero_grad()
        reference_loss = 0.0
        for batch, plan in batches(config, MICRO_BATCHES, exit_plans=plans):
            output = reference(**batch, exit_threshold=tau, exit_plan=plan)
            (output.loss / MICRO_BATCHES).backward()
            reference_loss += float(output.loss) / MICRO_BATCHES
        norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), GRAD_CLIP))
        with torch.no_grad():
            for parameter in reference.parameters():
                if parameter.grad is not None:
                    parameter -= parameter.grad
        # With SGD at lr 1 a parameter's change is its clipped gradient.
        difference = (
            sum(
                float(
                    (
                        (before[name] - mine[name].detach())
                        - (reference_before[name] - reference_parameters[name].detach())
                    )
                    .pow(2)
                    .sum()
                )
                for name in mine
            )
            ** 0.5
        )
        size = (
            sum(float((reference_before[name] - reference_parameters[name].detach()).pow(2).sum()) for name in mine)
            ** 0.5
        )
        steps.append(
            {
                "loss": loss,
                "reference_loss": reference_loss,
                "norm_before_clipping": norm,
                "gradient_error": difference / max(size, 1e-12),
                "gradient_norm": size,
                "first_layer_backward_passes": len(accumulations),
                "first_layer_forward_passes": len(forward_passes),
            }
        )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"stage": engine.stage_id, "steps": steps}, handle)


if __name__ == "__main__":
    main()
