"""Does early exit really save time? And how fast is full depth against Hugging Face?

electra-small, 128-token rows, one training step (forward, backward, AdamW) per timing.
Exits are forced (not steered by a controller) for 0, 25, 50 and 75% of the tokens after
the middle layer; the measured speedup over 0% is set against the ideal speedup from the
FLOP counter. `--routing plan` (the default) forces them with a per-token exit plan, routed as
threshold routing routes (gathers by the active mask); `--routing capacity` keeps that share of
each sequence running after the middle layer's head (capacity routing: the least confident rows
continue, static shapes). The same run times Hugging Face's ELECTRA (ElectraForMaskedLM generator +
ElectraForPreTraining discriminator of the same sizes, shared embeddings) two ways:

- "hf as-is": as its docs and examples compose it. The generator's 30,522-way vocabulary
  projection and log-softmax run on every position.
- "hf same-work": HF's own modules doing the work dsexit (and google-research/electra) does:
  the generator's prediction head and vocabulary projection on the masked rows only. This is
  the like-for-like baseline (`full_depth_vs_hf_same_work`).

Each runs in fp32 and under bf16 autocast (`--precision` picks one: on a CPU without native bf16
the bf16 arms take most of the run's time). The same run measures this machine's matmul
peak (bf16 and fp32, square products) and reports the model's FLOP/s (FLOP counter,
forward + backward = 3 x forward) as a share of it. Configurations are timed round-robin
so machine noise hits all alike; each figure is the median of the repetitions. The process starts
as the eager trainer does (`setup_process`: on a CPU, glibc's malloc tuned or tcmalloc where asked
for, and the CPU kernels; docs/cpu.md), every configuration alike.

    python bench/exit_speed.py [--repeats 5] [--batch 32] [--device cpu|cuda] [--precision both|fp32|bf16]
        [--routing plan|capacity] [--out bench/results/exit_speed.json]
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
import torch.nn.functional as F

from dsexit.eval.peak import matmul_peaks
from dsexit.host_allocator import allocator_in_use
from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel
from dsexit.model.hf import hf_config
from dsexit.train.cluster.distributed import setup_process

EXIT_FRACTIONS = (0.0, 0.25, 0.50, 0.75)
ROUTINGS = ("plan", "capacity")
DTYPES = ("fp32", "bf16")


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(config: ElectraExitConfig, batch: int, seq_len: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, config.vocab_size, (batch, seq_len), generator=generator)
    input_ids[:, 0] = config.cls_token_id
    input_ids[:, seq_len // 2] = config.sep_token_id
    input_ids[:, -1] = config.sep_token_id
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 + 1 :] = 1
    return tuple(t.to(device) for t in (input_ids, torch.ones_like(input_ids), token_type_ids))


class OursStep:
    """One dsexit training step with a forced exit plan."""

    def __init__(
        self,
        config: ElectraExitConfig,
        batch,
        exit_fraction: float,
        dtype: str,
        device: torch.device,
        compiled: bool = False,
        routing: str = "plan",
    ):
        torch.manual_seed(0)
        self.model = ElectraPreTrainingModel(config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch, self.dtype, self.device = batch, dtype, device
        middle = config.num_hidden_layers // 2
        exits = torch.rand(batch[0].shape, generator=torch.Generator().manual_seed(1)) < exit_fraction
        self.plan = torch.where(exits, middle, config.num_hidden_layers + 1).to(device)
        # Capacity routing: that share of each sequence leaves at the middle head (none: the dense model).
        self.capacity = {middle: 1.0 - exit_fraction} if routing == "capacity" and exit_fraction > 0 else None
        self.routing = routing if exit_fraction > 0 else "none"
        self.flops = None
        self.compiled = compiled
        if compiled:  # full depth: each encoder layer a compiled graph (compile time is in the warm-up)
            for layer in [*self.model.discriminator.electra.encoder.layer, *self.model.generator.electra.encoder.layer]:
                layer.compile()

    def __call__(self) -> None:
        with autocast(self.device, self.dtype):
            if self.capacity is not None:
                output = self.model(*self.batch, exit_capacity=self.capacity)
            else:
                output = self.model(*self.batch, exit_plan=None if self.compiled else self.plan)
        output.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.flops = output.flops


class OursBf16ParamsStep(OursStep):
    """Ours at full depth as DeepSpeed's bf16 mode runs it: bf16 parameters and activations (no autocast
    casts), fp32 master weights in the optimizer, gradients copied up and weights copied down each step."""

    def __init__(self, config: ElectraExitConfig, batch, device: torch.device):
        super().__init__(config, batch, 0.0, "fp32", device)
        self.master = [parameter.detach().clone().float() for parameter in self.model.parameters()]
        self.model.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.master, lr=1e-4)

    def __call__(self) -> None:
        output = self.model(*self.batch, exit_plan=self.plan)
        output.loss.backward()
        for master, parameter in zip(self.master, self.model.parameters()):
            master.grad = parameter.grad.float()
            parameter.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for master, parameter in zip(self.master, self.model.parameters()):
                parameter.copy_(master)
        self.flops = output.flops


class HFStep:
    """One Hugging Face ELECTRA pre-training step, built from HF's modules.

    same_work=False: as HF's docs and examples compose it (ElectraForMaskedLM scores every
    position). same_work=True: the generator's prediction head and vocabulary projection run on
    the masked rows only, as dsexit and google-research/electra do; the rest is HF's as-is.
    """

    def __init__(self, config: ElectraExitConfig, batch, dtype: str, device: torch.device, same_work: bool):
        from transformers import ElectraForMaskedLM, ElectraForPreTraining

        torch.manual_seed(0)
        self.generator = ElectraForMaskedLM(hf_config(config, "generator")).to(device)
        self.discriminator = ElectraForPreTraining(hf_config(config, "discriminator")).to(device)
        self.discriminator.electra.embeddings = self.generator.electra.embeddings
        parameters = {id(p): p for p in [*self.generator.parameters(), *self.discriminator.parameters()]}
        self.optimizer = torch.optim.AdamW(parameters.values(), lr=1e-4)
        self.config, self.batch, self.dtype, self.device, self.same_work = config, batch, dtype, device, same_work

    def _generator_logits_and_loss(self, generator_input, attention_mask, token_type_ids, input_ids, masked):
        if not self.same_work:
            labels = input_ids.masked_fill(~masked, -100)
            generated = self.generator(
                input_ids=generator_input, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels
            )
            return generated.logits[masked], generated.loss
        hidden = self.generator.electra(
            input_ids=generator_input, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.generator.generator_lm_head(self.generator.generator_predictions(hidden[masked]))
        return logits, F.cross_entropy(logits.float(), input_ids[masked])

    def __call__(self) -> None:
        input_ids, attention_mask, token_type_ids = self.batch
        special = (input_ids == self.config.cls_token_id) | (input_ids == self.config.sep_token_id)
        masked = (torch.rand(input_ids.shape, device=self.device) < self.config.mask_prob) & ~special
        generator_input = input_ids.masked_fill(masked, self.config.mask_token_id)
        with autocast(self.device, self.dtype):
            logits, generator_loss = self._generator_logits_and_loss(
                generator_input, attention_mask, token_type_ids, input_ids, masked
            )
            sampled = torch.distributions.Categorical(logits=logits.float().detach()).sample()
            corrupted = input_ids.clone()
            corrupted[masked] = sampled
            discriminated = self.discriminator(
                input_ids=corrupted,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                labels=(corrupted != input_ids).long(),
            )
            loss = generator_loss + self.config.disc_weight * discriminated.loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_round_robin(steps: dict[str, object], repeats: int, device: torch.device) -> dict[str, float]:
    for step in steps.values():  # warm-up: allocator, autocast caches, oneDNN primitives, CUDA kernels
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in samples.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, help="rows per step (default: 32 on a CPU, 256 on a GPU)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    parser.add_argument("--peak-size", type=int, help="matmul size for the peak (default: 2048 CPU, 8192 GPU)")
    parser.add_argument(
        "--compile", action="store_true", help="also time ours at full depth with torch.compile'd layers"
    )
    parser.add_argument(
        "--full-depth-only",
        action="store_true",
        help="only ours at full depth and HF same-work (quick ablations of the dense path)",
    )
    parser.add_argument(
        "--precision", choices=("both", *DTYPES), default="both", help="the precisions timed (default: both)"
    )
    parser.add_argument(
        "--routing", choices=ROUTINGS, default="plan", help="how the forced exits route (default: plan)"
    )
    parser.add_argument("--out", default="bench/results/exit_speed.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.environ["DS_ACCELERATOR"] = device.type
    setup_process()  # as the eager trainer starts: on a CPU, the CPU tuning and kernels (docs/cpu.md)
    batch_size = args.batch or (256 if device.type == "cuda" else 32)
    config = ElectraExitConfig.from_preset(args.preset)
    batch = make_batch(config, batch_size, args.seq_len, device)
    tokens = batch_size * args.seq_len
    steps: dict[str, object] = {}
    fractions = EXIT_FRACTIONS[:1] if args.full_depth_only else EXIT_FRACTIONS
    dtypes = DTYPES if args.precision == "both" else (args.precision,)
    for dtype in dtypes:
        for fraction in fractions:
            steps[f"ours {dtype} exit={fraction:.2f}"] = OursStep(
                config, batch, fraction, dtype, device, routing=args.routing
            )
        steps[f"hf same-work {dtype}"] = HFStep(config, batch, dtype, device, same_work=True)
        if not args.full_depth_only:
            steps[f"hf as-is {dtype}"] = HFStep(config, batch, dtype, device, same_work=False)
        if args.compile:
            steps[f"ours {dtype} compiled"] = OursStep(config, batch, 0.0, dtype, device, compiled=True)
    if not args.full_depth_only and "bf16" in dtypes:
        steps["ours bf16-params exit=0.00"] = OursBf16ParamsStep(config, batch, device)
    print(
        f"timing {len(steps)} configurations x {args.repeats} repeats on {device_name(device)}, "
        f"{allocator_in_use()}'s malloc",
        file=sys.stderr,
    )
    seconds = time_round_robin(steps, args.repeats, device)
    if args.full_depth_only:
        ratios = {dtype: seconds[f"hf same-work {dtype}"] / seconds[f"ours {dtype} exit=0.00"] for dtype in dtypes}
        for name, value in seconds.items():
            print(f"{name:<24}{value:>8.3f} s/step")
        if args.compile:
            for dtype in dtypes:
                compiled = seconds[f"ours {dtype} compiled"]
                print(
                    f"compiled {dtype}: {seconds[f'hf same-work {dtype}'] / compiled:.3f}x HF same-work, "
                    f"{seconds[f'ours {dtype} exit=0.00'] / compiled:.3f}x eager"
                )
        print(
            "RESULT exit_speed_full_depth "
            + " ".join(f"full_depth_vs_hf_same_work_{d}={r:.3f}" for d, r in ratios.items())
        )
        Path(args.out).write_text(json.dumps({"seconds": seconds, "ratios": ratios, "batch": batch_size}, indent=2))
        return
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peaks = matmul_peaks(device, peak_size)
    results = summarize(steps, seconds, peaks, tokens, device, dtypes)
    results.update(
        preset=args.preset, batch=batch_size, seq_len=args.seq_len, peak_matmul_size=peak_size, routing=args.routing
    )
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    headline = ["full_depth_vs_hf_same_work", "efficiency_at_50", "peak_share_bf16"]
    headline += ["full_depth_vs_hf_same_work_bf16", "full_depth_vs_hf_as_is", "peak_share_fp32"]
    print(
        "RESULT exit_speed "
        + " ".join(f"{key}={results[key]:.3f}" for key in headline if key in results)
        + f" routing={args.routing}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} threads"


def summarize(
    steps: dict,
    seconds: dict[str, float],
    peaks: dict[str, float],
    tokens: int,
    device: torch.device,
    dtypes: tuple[str, ...] = DTYPES,
) -> dict:
    configs = {}
    for dtype in dtypes:
        full = seconds[f"ours {dtype} exit=0.00"]
        for fraction in EXIT_FRACTIONS:
            name = f"ours {dtype} exit={fraction:.2f}"
            flops = steps[name].flops
            measured = full / seconds[name]
            configs[name] = dict(
                routing=steps[name].routing,
                tokens_per_s=tokens / seconds[name],
                seconds_per_step=seconds[name],
                speedup=measured,
                ideal_speedup=flops.ideal_speedup,
                efficiency=measured / flops.ideal_speedup,
                model_flops_per_s=flops.training_flops / seconds[name],
                peak_share=flops.training_flops / seconds[name] / peaks[dtype],
            )
        for kind in ("same-work", "as-is"):
            name = f"hf {kind} {dtype}"
            configs[name] = dict(
                tokens_per_s=tokens / seconds[name],
                seconds_per_step=seconds[name],
                ours_full_depth_speedup=seconds[name] / full,
            )
    if "ours bf16-params exit=0.00" in steps:
        name = "ours bf16-params exit=0.00"
        flops = steps[name].flops
        configs[name] = dict(
            tokens_per_s=tokens / seconds[name],
            seconds_per_step=seconds[name],
            speedup=seconds["ours bf16 exit=0.00"] / seconds[name],
            ideal_speedup=1.0,
            efficiency=seconds["ours bf16 exit=0.00"] / seconds[name],
            model_flops_per_s=flops.training_flops / seconds[name],
            peak_share=flops.training_flops / seconds[name] / peaks["bf16"],
        )
    best = {label: min(seconds[f"{label} {dtype}"] for dtype in dtypes) for label in ("hf same-work", "hf as-is")}
    ours_best = min(seconds[f"ours {dtype} exit=0.00"] for dtype in dtypes)
    fastest = min(dtypes, key=lambda dtype: seconds[f"ours {dtype} exit=0.00"])
    results = {
        "device": device_name(device),
        "host_allocator": allocator_in_use(),
        "precisions": list(dtypes),
        "configs": configs,
        "peak_flops_per_s": peaks,
        "full_depth_vs_hf_same_work": best["hf same-work"] / ours_best,
        "full_depth_vs_hf_as_is": best["hf as-is"] / ours_best,
        "efficiency_at_50": configs[f"ours {fastest} exit=0.50"]["efficiency"],
        "efficiency_at_50_dtype": fastest,
    }
    for dtype in dtypes:
        results[f"full_depth_vs_hf_same_work_{dtype}"] = (
            seconds[f"hf same-work {dtype}"] / seconds[f"ours {dtype} exit=0.00"]
        )
        results[f"peak_share_{dtype}"] = configs[f"ours {dtype} exit=0.00"]["peak_share"]
    if "ours bf16-params exit=0.00" in steps:
        results["bf16_params_vs_autocast"] = seconds["ours bf16 exit=0.00"] / seconds["ours bf16-params exit=0.00"]
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{results['device']}; batch {results['batch']} x {results['seq_len']}; exits routed by "
        f"{results.get('routing', 'plan')}; "
        f"matmul peak bf16 {results['peak_flops_per_s']['bf16'] / 1e12:.2f} TFLOP/s, "
        f"fp32 {results['peak_flops_per_s']['fp32'] / 1e12:.2f} TFLOP/s ({results['peak_matmul_size']}^3)"
    )
    print(
        f"{'configuration':<22}{'routing':>9}{'tokens/s':>11}{'speedup':>9}{'ideal':>7}{'meas/ideal':>11}"
        f"{'TFLOP/s':>9}{'of peak':>9}{'ours faster':>12}"
    )
    for name, row in results["configs"].items():
        if name.startswith("ours"):
            print(
                f"{name:<22}{row.get('routing', '-'):>9}{row['tokens_per_s']:>11.0f}{row['speedup']:>9.2f}"
                f"{row['ideal_speedup']:>7.2f}{row['efficiency']:>11.3f}"
                f"{row['model_flops_per_s'] / 1e12:>9.3f}{row['peak_share']:>9.3f}"
                f"{'-':>12}"
            )
        else:
            print(
                f"{name:<22}{'-':>9}{row['tokens_per_s']:>11.0f}{'-':>9}{'-':>7}{'-':>11}{'-':>9}{'-':>9}"
                f"{row['ours_full_depth_speedup']:>12.3f}"
            )
    if "ours bf16-params exit=0.00" in results["configs"]:
        print(
            "bf16-params = DeepSpeed's bf16 mode (bf16 weights, fp32 master copy); its speedup column is against "
            "ours under bf16 autocast at full depth"
        )
    print(
        "ours faster = the HF configuration's step time / ours at full depth in the same precision; "
        "TFLOP/s = FLOP counter (forward + backward) / step time"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
