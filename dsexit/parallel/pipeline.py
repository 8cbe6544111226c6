"""The early-exit ELECTRA as a DeepSpeed `PipelineModule`.

Layer sequence: `EmbedAndCorrupt` (embeddings, masking, generator, sampling, the
discriminator's embedding) - one `DiscriminatorLayerPipe` per discriminator layer (with
its exit head, or the final head on the last) - loss on the last stage. Stages pass one
tuple of fixed-shape tensors (`PIPE_FIELDS`): the hidden states, the exit logits, the
running losses, and integer flags (masks, labels, exit layers, token-layer counts), so
the last stage can add everything up. DeepSpeed sends a gradient back for every float
tensor in the tuple, so each of them must take part in the graph on every stage.

A stage whose micro-batch has no active token runs none of its layers and returns its
input unchanged; `StageCounters` records skipped micro-batches and executed token-layers.
The exit threshold is not data: the trainer sets it on every stage with `set_exit_threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import ElectraExitConfig, ElectraPreTrainingModel, ExitDecision, ExitState
from ..model.discriminator import ElectraDiscriminator, exitable_tokens, run_exit_layer
from ..model.pretraining import CorruptionMixin, objective_loss

PIPE_FIELDS = ("hidden", "logits", "losses", "attention_mask", "active", "exitable", "exit_layer", "rtd_labels",
               "exit_plan", "token_layers")


@dataclass
class StageCounters:
    """What this process's pipeline layers did since the last `reset`."""

    micro_batches: int = 0
    skipped_micro_batches: int = 0
    token_layers: int = 0

    def reset(self) -> None:
        self.micro_batches = self.skipped_micro_batches = self.token_layers = 0


STAGE_COUNTERS = StageCounters()


def pack(state: ExitState, losses: torch.Tensor, exit_plan: torch.Tensor, token_layers: torch.Tensor):
    return (state.hidden, state.logits, losses, state.attention_mask.long(), state.active.long(),
            state.exitable.long(), state.exit_layer, state.labels.long(), exit_plan, token_layers)


def unpack(inputs) -> tuple[ExitState, torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, logits, losses, attention_mask, active, exitable, exit_layer, rtd_labels, exit_plan, token_layers = inputs
    state = ExitState(hidden=hidden, attention_mask=attention_mask.bool(), active=active.bool(), logits=logits,
                      exit_layer=exit_layer, aux_loss=losses.new_zeros(()), exitable=exitable.bool(),
                      labels=rtd_labels.float())
    return state, losses, exit_plan, token_layers


class EmbedAndCorrupt(CorruptionMixin, nn.Module):
    """First layer: masking, generator MLM, replacement sampling, discriminator embedding.

    Holds the shared embeddings, the discriminator's embedding projection and the
    generator, taken from an `ElectraPreTrainingModel` (names map back in
    `pipeline_state_dict_to_model`).
    """

    def __init__(self, model: ElectraPreTrainingModel):
        super().__init__()
        self.config = model.config
        self.embeddings = model.embeddings
        if hasattr(model.discriminator.electra, "embeddings_project"):
            self.embeddings_project = model.discriminator.electra.embeddings_project
        self.generator = model.generator
        self.register_buffer("special_token_ids", model.special_token_ids.clone(), persistent=False)
        self.register_buffer("replacement_probs", model.replacement_probs.clone())
        self.num_layers = model.config.num_hidden_layers

    replacement_mix: float | None = None  # set by the trainer each step (`set_replacement_mix`)

    def forward(self, inputs):
        input_ids, attention_mask, token_type_ids, exit_plan = inputs
        corrupted, rtd_labels, generator_loss = self.corrupt(input_ids, attention_mask, token_type_ids,
                                                             replacement_mix=type(self).replacement_mix)
        hidden = self.embeddings(corrupted, token_type_ids)
        if hasattr(self, "embeddings_project"):
            hidden = self.embeddings_project(hidden)
        state = ExitState.start(hidden, attention_mask, rtd_labels,
                                exitable_tokens(input_ids, attention_mask, self.config))
        # Leaves that require grad: DeepSpeed calls backward on every float output.
        state.logits.requires_grad_(True)
        losses = torch.stack([generator_loss.float(), state.aux_loss])
        if not losses.requires_grad:
            losses.requires_grad_(True)
        token_layers = torch.zeros(self.num_layers, dtype=torch.long, device=input_ids.device)
        return pack(state, losses, exit_plan, token_layers)


class DiscriminatorLayerPipe(nn.Module):
    """Discriminator layer `layer_number` with its head, as one pipeline layer."""

    exit_threshold: float | None = None

    def __init__(self, discriminator: ElectraDiscriminator, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.config = discriminator.config
        self.layer = discriminator.electra.encoder.layer[layer_number - 1]
        self.head = discriminator.head_for(layer_number)
        self.first_of_stage = False

    def forward(self, inputs):
        state, losses, exit_plan, token_layers = unpack(inputs)
        if self.first_of_stage:
            STAGE_COUNTERS.micro_batches += 1
        if not bool(state.active.any()):
            if self.first_of_stage:
                STAGE_COUNTERS.skipped_micro_batches += 1
            return inputs  # every token exited upstream: nothing to compute here
        forced = bool((exit_plan <= self.config.num_hidden_layers).any())
        decision = ExitDecision.for_config(self.config, threshold=type(self).exit_threshold,
                                           plan=exit_plan if forced else None)
        state = run_exit_layer(self.layer, self.head, self.layer_number, self.config, state, decision)
        executed = state.work[-1].token_layers
        STAGE_COUNTERS.token_layers += executed
        token_layers = token_layers.clone()
        token_layers[self.layer_number - 1] = executed
        losses = losses + torch.stack([losses.new_zeros(()), state.aux_loss])
        return pack(state, losses, exit_plan, token_layers)


@dataclass
class MicroBatchResult:
    """What the last stage measured on one micro-batch (the fields the trainer's step statistics read)."""

    loss: torch.Tensor
    generator_loss: float
    discriminator_loss: float
    rtd_accuracy: float
    tokens_executed: int
    tokens_full: int
    exit_layer_counts: torch.Tensor


LAST_STAGE_RESULTS: list[MicroBatchResult] = []
"""Filled by the loss function on the last stage; the trainer drains it after `train_batch`."""


def pipeline_loss(config: ElectraExitConfig):
    """The last stage's loss: the model's `objective_loss` over the running losses of the tuple."""
    num_exit_heads = max(1, len(config.exit_layers))

    def loss_fn(outputs, _labels):
        state, losses, _plan, token_layers = unpack(outputs)
        real = state.attention_mask
        logits, labels = state.logits[real], state.labels[real]
        rtd = F.binary_cross_entropy_with_logits(logits, labels)
        loss = objective_loss(config, losses[0], rtd, losses[1] / num_exit_heads)
        with torch.no_grad():
            LAST_STAGE_RESULTS.append(MicroBatchResult(
                loss=loss.detach(), generator_loss=float(losses[0]), discriminator_loss=float(rtd),
                rtd_accuracy=float(((logits > 0).float() == labels).float().mean()),
                tokens_executed=int(token_layers.sum()), tokens_full=int(state.exitable.sum()) * config.num_hidden_layers,
                exit_layer_counts=torch.bincount(state.exit_layer[real], minlength=config.num_hidden_layers + 1)[1:]))
        # The hidden states reach the loss only through active tokens; when none is left,
        # this keeps them in the graph so DeepSpeed can send their (zero) gradient back.
        return loss + 0.0 * state.hidden.sum()

    return loss_fn


def set_exit_threshold(threshold: float | None) -> None:
    DiscriminatorLayerPipe.exit_threshold = threshold


def set_replacement_mix(mix: float | None) -> None:
    EmbedAndCorrupt.replacement_mix = mix


def build_pipeline_module(config: ElectraExitConfig, num_stages: int, partition_method: str = "type:DiscriminatorLayerPipe",
                          model: ElectraPreTrainingModel | None = None, **pipeline_kwargs):
    """A `deepspeed.pipe.PipelineModule` holding the same parameters as `ElectraPreTrainingModel`.

    Each process builds the whole model once on the CPU (for identical initial weights)
    and keeps only its stage's layers.
    """
    from deepspeed.pipe import PipelineModule

    model = model or ElectraPreTrainingModel(config)
    layers = [EmbedAndCorrupt(model)]
    layers += [DiscriminatorLayerPipe(model.discriminator, number)
               for number in range(1, config.num_hidden_layers + 1)]
    module = PipelineModule(layers=layers, num_stages=num_stages, loss_fn=pipeline_loss(config),
                            partition_method=partition_method, **pipeline_kwargs)
    local = [layer for layer in module.forward_funcs if isinstance(layer, DiscriminatorLayerPipe)]
    if local:
        local[0].first_of_stage = True
    return module


def pipeline_state_dict_to_model(layer_states: dict[int, dict[str, torch.Tensor]], config: ElectraExitConfig):
    """Map per-layer pipeline weights (layer index -> state dict) to `ElectraPreTrainingModel` names."""
    merged: dict[str, torch.Tensor] = {}
    for index, state in layer_states.items():
        for name, tensor in state.items():
            if index == 0:
                for prefix, target in (("embeddings.", "discriminator.electra.embeddings."),
                                       ("embeddings_project.", "discriminator.electra.embeddings_project."),
                                       ("generator.", "generator."), ("replacement_probs", "replacement_probs")):
                    if name.startswith(prefix):
                        merged[target + name[len(prefix):]] = tensor
                continue
            if name.startswith("layer."):
                merged[f"discriminator.electra.encoder.layer.{index - 1}.{name[len('layer.'):]}"] = tensor
            elif name.startswith("head."):
                owner = ("discriminator.discriminator_predictions" if index == config.num_hidden_layers
                         else f"discriminator.exit_heads.{index}")
                merged[f"{owner}.{name[len('head.'):]}"] = tensor
    return merged
