"""Worker for the pipeline tests: run under `torchrun --nproc_per_node 2` (2 stages, dp 1).

Builds the same weights as the data-parallel model, runs `train_batch` on fixed data, and
writes what each stage observed to OUT_DIR/rank{r}.json.
"""

import json
import os
import sys

import deepspeed
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.parallel.pipeline import STAGE_COUNTERS, build_pipeline_module, set_exit_threshold


def batches(config, micro_batches, batch_size=4, seq_len=32, exit_plans=None):
    generator = torch.Generator().manual_seed(7)
    for index in range(micro_batches):
        input_ids = torch.randint(200, config.vocab_size, (batch_size, seq_len), generator=generator)
        input_ids[:, 0] = config.cls_token_id
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, seq_len - 5:] = 0
        input_ids[0, seq_len - 5:] = config.pad_token_id
        token_type_ids = torch.zeros_like(input_ids)
        plan = exit_plans[index] if exit_plans else torch.full_like(input_ids, config.num_hidden_layers + 1)
        yield (input_ids, attention_mask, token_type_ids, plan), torch.zeros(1)


def main():
    out_dir, mode = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = ElectraExitConfig.from_preset("electra-tiny", vocab_size=1000, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0)
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
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": micro_batches,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": 1 if mode != "zero0" else 0}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config,
                                           model_parameters=[p for p in module.parameters()])
    set_exit_threshold(None)
    torch.manual_seed(123)
    losses = []
    counters = []
    steps = 3 if mode != "reference" else 1
    for _ in range(steps):
        STAGE_COUNTERS.reset()
        losses.append(float(engine.train_batch(iter(list(batches(config, micro_batches, exit_plans=plans))))))
        counters.append(dict(vars(STAGE_COUNTERS)))
    # The data-parallel path on the same weights, data and RNG seed, for the first step.
    torch.manual_seed(0)
    reference = ElectraPreTrainingModel(config)
    reference.load_state_dict(reference_state)
    torch.manual_seed(123)
    reference_losses = []
    for (input_ids, attention_mask, token_type_ids, plan), _ in batches(config, micro_batches, exit_plans=plans):
        output = reference(input_ids, attention_mask, token_type_ids,
                           exit_plan=plan if (plan <= config.num_hidden_layers).any() else None)
        reference_losses.append(float(output.loss))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"losses": losses, "counters": counters, "stage": engine.stage_id,
                   "reference_first_loss": sum(reference_losses) / len(reference_losses)}, handle)


if __name__ == "__main__":
    main()
