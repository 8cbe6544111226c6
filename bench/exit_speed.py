"""Does early exit really save time? And how fast is full depth against Hugging Face?

electra-small, batch 32 x 128, one training step (forward, backward, AdamW) per timing.
Exits are forced (an exit plan, not confidence) for 0, 25, 50 and 75% of the tokens after
the middle layer; the measured speedup over 0% is set against the ideal speedup from the
FLOP counter. The same run times Hugging Face's ELECTRA (ElectraForMaskedLM generator +
ElectraForPreTraining discriminator of the same sizes, shared embeddings) in fp32 and
under bf16 autocast. Configurations are timed round-robin so machine noise hits all alike;
each figure is the median of the repetitions.

    python bench/exit_speed.py [--repeats 5] [--batch 32] [--seq-len 128] [--out bench/results/exit_speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.hf import hf_config

EXIT_FRACTIONS = (0.0, 0.25, 0.50, 0.75)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def make_batch(config: ElectraExitConfig, batch: int, seq_len: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, config.vocab_size, (batch, seq_len), generator=generator)
    input_ids[:, 0] = config.cls_token_id
    input_ids[:, seq_len // 2] = config.sep_token_id
    input_ids[:, -1] = config.sep_token_id
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 + 1:] = 1
    return input_ids, torch.ones_like(input_ids), token_type_ids


class OursStep:
    """One dsexit training step with a forced exit plan."""

    def __init__(self, config: ElectraExitConfig, batch, exit_fraction: float, dtype: str):
        torch.manual_seed(0)
        self.model = ElectraPreTrainingModel(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch, self.dtype = batch, dtype
        middle = config.num_hidden_layers // 2
        exits = torch.rand(batch[0].shape, generator=torch.Generator().manual_seed(1)) < exit_fraction
        self.plan = torch.where(exits, middle, config.num_hidden_layers + 1)
        self.flops = None

    def __call__(self) -> None:
        with autocast(self.dtype):
            output = self.model(*self.batch, exit_plan=self.plan)
        output.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.flops = output.flops


class HFStep:
    """One Hugging Face ELECTRA pre-training step (as its docs and examples compose it)."""

    def __init__(self, config: ElectraExitConfig, batch, dtype: str):
        from transformers import ElectraForMaskedLM, ElectraForPreTraining

        torch.manual_seed(0)
        self.generator = ElectraForMaskedLM(hf_config(config, "generator"))
        self.discriminator = ElectraForPreTraining(hf_config(config, "discriminator"))
        self.discriminator.electra.embeddings = self.generator.electra.embeddings
        parameters = {id(p): p for p in [*self.generator.parameters(), *self.discriminator.parameters()]}
        self.optimizer = torch.optim.AdamW(parameters.values(), lr=1e-4)
        self.config, self.batch, self.dtype = config, batch, dtype

    def __call__(self) -> None:
        input_ids, attention_mask, token_type_ids = self.batch
        special = (input_ids == self.config.cls_token_id) | (input_ids == self.config.sep_token_id)
        masked = (torch.rand(input_ids.shape) < self.config.mask_prob) & ~special
        generator_input = input_ids.masked_fill(masked, self.config.mask_token_id)
        labels = input_ids.masked_fill(~masked, -100)
        with autocast(self.dtype):
            generated = self.generator(input_ids=generator_input, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids, labels=labels)
            sampled = torch.distributions.Categorical(logits=generated.logits[masked].float().detach()).sample()
            corrupted = input_ids.clone()
            corrupted[masked] = sampled
            discriminated = self.discriminator(input_ids=corrupted, attention_mask=attention_mask,
                                               token_type_ids=token_type_ids,
                                               labels=(corrupted != input_ids).long())
            loss = generated.loss + self.config.disc_weight * discriminated.loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_round_robin(steps: dict[str, object], repeats: int) -> dict[str, float]:
    for step in steps.values():  # warm-up: allocator, autocast caches, oneDNN primitives
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--out", default="bench/results/exit_speed.json")
    args = parser.parse_args()

    config = ElectraExitConfig.from_preset(args.preset)
    batch = make_batch(config, args.batch, args.seq_len)
    tokens = args.batch * args.seq_len
    steps: dict[str, object] = {}
    for dtype in ("fp32", "bf16"):
        for fraction in EXIT_FRACTIONS:
            steps[f"ours {dtype} exit={fraction:.2f}"] = OursStep(config, batch, fraction, dtype)
        steps[f"hf {dtype}"] = HFStep(config, batch, dtype)
    print(f"timing {len(steps)} configurations x {args.repeats} repeats on {torch.get_num_threads()} threads",
          file=sys.stderr)
    seconds = time_round_robin(steps, args.repeats)

    rows, results = [], {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
                         "threads": torch.get_num_threads(), "configs": {}}
    for dtype in ("fp32", "bf16"):
        full = seconds[f"ours {dtype} exit=0.00"]
        for fraction in EXIT_FRACTIONS:
            name = f"ours {dtype} exit={fraction:.2f}"
            ideal = steps[name].flops.ideal_speedup
            measured = full / seconds[name]
            rows.append((name, tokens / seconds[name], measured, ideal, measured / ideal))
        rows.append((f"hf {dtype}", tokens / seconds[f"hf {dtype}"], None, None, None))
    for name, tokens_per_s, measured, ideal, efficiency in rows:
        results["configs"][name] = {"tokens_per_s": tokens_per_s, "speedup": measured,
                                    "ideal_speedup": ideal, "efficiency": efficiency,
                                    "seconds_per_step": tokens / tokens_per_s}

    best_ours = max(seconds[f"ours {d} exit=0.00"] ** -1 for d in ("fp32", "bf16")) * tokens
    best_hf = max(seconds[f"hf {d}"] ** -1 for d in ("fp32", "bf16")) * tokens
    best_efficiency_at_50 = max(results["configs"][f"ours {d} exit=0.50"]["efficiency"] for d in ("fp32", "bf16"))
    fastest = "bf16" if seconds["ours bf16 exit=0.00"] < seconds["ours fp32 exit=0.00"] else "fp32"
    efficiency_at_50 = results["configs"][f"ours {fastest} exit=0.50"]["efficiency"]
    results.update(full_depth_vs_hf=best_ours / best_hf, efficiency_at_50=efficiency_at_50,
                   efficiency_at_50_dtype=fastest, best_efficiency_at_50=best_efficiency_at_50)

    print(f"\n{'configuration':<24}{'tokens/s':>10}{'speedup':>10}{'ideal':>8}{'measured/ideal':>16}")
    for name, tokens_per_s, measured, ideal, efficiency in rows:
        cells = [f"{value:>10.2f}" if value is not None else f"{'-':>10}" for value in (measured,)]
        print(f"{name:<24}{tokens_per_s:>10.0f}{cells[0]}"
              + (f"{ideal:>8.2f}{efficiency:>16.2f}" if ideal else f"{'-':>8}{'-':>16}"))
    print(f"\nfull depth, best of fp32/bf16: ours {best_ours:.0f} tokens/s, HF {best_hf:.0f} tokens/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(f"RESULT exit_speed efficiency_at_50={efficiency_at_50:.3f} full_depth_vs_hf={best_ours / best_hf:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
