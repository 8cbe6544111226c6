"""The early-exit ELECTRA as a DeepSpeed `PipelineModule`.

Layer sequence: `EmbedAndCorrupt` (embeddings, masking, generator, sampling, the
discriminator's embedding) - one `DiscriminatorLayerPipe` per discriminator layer (with
its exit head, or the final head on the last) - `PipelineLoss` on the last stage. Stages pass
one tuple of fixed-shape tensors (`PIPE_FIELDS`): the hidden states, the exit logits, the
running losses, and integer tensors (masks, labels, exit layers, token-layer counts, the exit
plan, and this step's settings), so the last stage can add everything up. DeepSpeed sends a
gradient back for every float tensor in the tuple, so each of them must take part in the graph
on every stage; the step's settings (tau, the replacement mix) therefore travel as the bits of
float64 values in an int64 tensor (`encode_settings`), fed in with every micro-batch.

DeepSpeed's engine runs a non-last stage's backward as one `backward` call per float output,
each with `retain_graph`, and each call walks everything its output depends on: a stage whose
layers feed all three (hidden states; exit heads feed the logits and the losses) would run their
backward three times per micro-batch. So the last layer of such a stage passes its float
outputs through `join_stage_gradients`, whose backward holds the gradients until all have
arrived and then sends them on together: one backward per micro-batch, the same gradients.

A stage whose micro-batch has no active token runs none of its layers and returns its
input unchanged. What the stages did (`StageCounters`) and what the last stage measured
(`PipelineLoss.results`) live on objects the module carries (`module.stage_counters`,
`module.loss_fn`), which the trainer's pipeline step runner reads after `train_batch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model import ElectraExitConfig, ElectraPreTrainingModel, ExitDecision, ExitState
from ..model.discriminator import ElectraDiscriminator, exitable_tokens, run_exit_layer
from ..model.pretraining import CorruptionMixin, loss_and_statistics

PIPE_FIELDS = (
    "hidden",
    "logits",
    "losses",
    "attention_mask",
    "active",
    "exitable",
    "exit_layer",
    "rtd_labels",
    "exit_plan",
    "token_layers",
    "settings",
)


@dataclass
class StageCounters:
    """What this process's pipeline layers did since the last `reset`."""

    micro_batches: int = 0
    skipped_micro_batches: int = 0
    token_layers: int = 0

    def reset(self) -> None:
        self.micro_batches = self.skipped_micro_batches = self.token_layers = 0


def encode_settings(exit_threshold: float | None, replacement_mix: float | None) -> torch.Tensor:
    """One step's settings as an int64 [2] tensor: the bits of (tau, mix) as float64; NaN means None."""
    values = [math.nan if value is None else float(value) for value in (exit_threshold, replacement_mix)]
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def decode_settings(settings: torch.Tensor) -> tuple[float | None, float | None]:
    exit_threshold, replacement_mix = settings.detach().cpu().view(torch.float64).tolist()
    return (
        None if math.isnan(exit_threshold) else exit_threshold,
        None if math.isnan(replacement_mix) else replacement_mix,
    )


class _JoinedBackward(torch.autograd.Function):
    """Identity on a stage's float outputs whose backward passes their gradients on only once every
    output has received one (summed, should one arrive twice), and nothing before: DeepSpeed's
    one-`backward`-per-output loop then walks the stage's graph once, with all the gradients."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.held = [None] * len(tensors)
        return tuple(tensor.clone() for tensor in tensors)

    @staticmethod
    def backward(ctx, *gradients: torch.Tensor | None):
        for index, gradient in enumerate(gradients):
            if gradient is not None:
                held = ctx.held[index]
                ctx.held[index] = gradient if held is None else held + gradient
        if any(held is None for held in ctx.held):
            return (None,) * len(gradients)
        joined, ctx.held = tuple(ctx.held), [None] * len(gradients)
        return joined


def join_stage_gradients(outputs: tuple) -> tuple:
    """`outputs` with its float tensors passed through `_JoinedBackward` (for the last layer of a
    stage that is not the pipeline's last: see the module docstring)."""
    floats = [index for index, tensor in enumerate(outputs) if tensor.is_floating_point()]
    joined = list(outputs)
    for index, tensor in zip(floats, _JoinedBackward.apply(*(outputs[index] for index in floats))):
        joined[index] = tensor
    return tuple(joined)


def pack(
    state: ExitState, losses: torch.Tensor, exit_plan: torch.Tensor, token_layers: torch.Tensor, settings: torch.Tensor
):
    return (
        state.hidden,
        state.logits,
        losses,
        state.attention_mask.long(),
        state.active.long(),
        state.exitable.long(),
        state.exit_layer,
        state.labels.long(),
        exit_plan,
        token_layers,
        settings,
    )


def unpack(inputs) -> tuple[ExitState, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (
        hidden,
        logits,
        losses,
        attention_mask,
        active,
        exitable,
        exit_layer,
        rtd_labels,
        exit_plan,
        token_layers,
        settings,
    ) = inputs
    state = ExitState(
        stored_hidden=hidden,
        attention_mask=attention_mask.bool(),
        active=active.bool(),
        logits=logits,
        exit_layer=exit_layer,
        aux_loss=losses.new_zeros(()),
        exitable=exitable.bool(),
        labels=rtd_labels.float(),
        padding_mask=attention_mask.bool(),
    )
    return state, losses, exit_plan, token_layers, settings


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
        self.joins_gradients = False  # set on the last layer of a stage that is not the last stage

    def forward(self, inputs):
        input_ids, attention_mask, token_type_ids, exit_plan, settings = inputs
        corrupted, rtd_labels, generator_loss = self.corrupt(
            input_ids, attention_mask, token_type_ids, replacement_mix=decode_settings(settings)[1]
        )
        hidden = self.embeddings(corrupted, token_type_ids)
        if hasattr(self, "embeddings_project"):
            hidden = self.embeddings_project(hidden)
        state = ExitState.start(
            hidden, attention_mask, rtd_labels, exitable_tokens(input_ids, attention_mask, self.config)
        )
        # Leaves that require grad: DeepSpeed calls backward on every float output.
        state.logits.requires_grad_(True)
        losses = torch.stack([generator_loss.float(), state.aux_loss])
        if not losses.requires_grad:
            losses.requires_grad_(True)
        token_layers = torch.zeros(self.num_layers, dtype=torch.long, device=input_ids.device)
        outputs = pack(state, losses, exit_plan, token_layers, settings)
        return join_stage_gradients(outputs) if self.joins_gradients else outputs


class DiscriminatorLayerPipe(nn.Module):
    """Discriminator layer `layer_number` with its head, as one pipeline layer.

    `counters` is shared by the layers of one module; the first layer of a stage counts its
    micro-batches (`build_pipeline_module` marks it).
    """

    def __init__(self, discriminator: ElectraDiscriminator, layer_number: int, counters: StageCounters):
        super().__init__()
        self.layer_number = layer_number
        self.config = discriminator.config
        self.layer = discriminator.electra.encoder.layer[layer_number - 1]
        self.head = discriminator.head_for(layer_number)
        self.counters = counters
        self.first_of_stage = False
        self.joins_gradients = False  # set on the last layer of a stage that is not the last stage

    def forward(self, inputs):
        outputs = self._run(inputs)
        return join_stage_gradients(outputs) if self.joins_gradients else outputs

    def _run(self, inputs):
        state, losses, exit_plan, token_layers, settings = unpack(inputs)
        if self.first_of_stage:
            self.counters.micro_batches += 1
        if not bool(state.active.any()):
            if self.first_of_stage:
                self.counters.skipped_micro_batches += 1
            return inputs  # every token exited upstream: nothing to compute here
        forced = bool((exit_plan <= self.config.num_hidden_layers).any())
        decision = ExitDecision.for_config(
            self.config, threshold=decode_settings(settings)[0], plan=exit_plan if forced else None
        )
        state = run_exit_layer(self.layer, self.head, self.layer_number, self.config, state, decision)
        executed = state.work[-1].token_layers
        self.counters.token_layers += executed
        token_layers = token_layers.clone()
        token_layers[self.layer_number - 1] = executed
        losses = losses + torch.stack([losses.new_zeros(()), state.aux_loss])
        return pack(state, losses, exit_plan, token_layers, settings)


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


class PipelineLoss:
    """The last stage's loss: `loss_and_statistics` over the state and running losses of the tuple.

    Appends each micro-batch's measurements to `results`; the trainer clears and reads them
    around `train_batch`.
    """

    def __init__(self, config: ElectraExitConfig):
        self.config = config
        self.results: list[MicroBatchResult] = []

    def __call__(self, outputs, _labels):
        state, losses, _plan, token_layers, _settings = unpack(outputs)
        state.aux_loss = losses[1]
        result = loss_and_statistics(self.config, state, state.labels, losses[0])
        self.results.append(
            MicroBatchResult(
                loss=result.loss.detach(),
                generator_loss=float(result.generator_loss),
                discriminator_loss=float(result.discriminator_loss),
                rtd_accuracy=float(result.rtd_accuracy),
                tokens_executed=int(token_layers.sum()),
                tokens_full=int(state.exitable.sum()) * self.config.num_hidden_layers,
                exit_layer_counts=result.exit_layer_counts,
            )
        )
        # The hidden states reach the loss only through active tokens; when none is left,
        # this keeps them in the graph so DeepSpeed can send their (zero) gradient back.
        return result.loss + 0.0 * state.hidden.sum()


def micro_batch_inputs(
    batch: dict[str, torch.Tensor],
    config: ElectraExitConfig,
    exit_threshold: float | None,
    replacement_mix: float | None,
    exit_plan: torch.Tensor | None = None,
):
    """One item of the data iterator `train_batch` reads: (first stage's inputs, dummy labels)."""
    input_ids = batch["input_ids"]
    if exit_plan is None:
        exit_plan = torch.full_like(input_ids, config.num_hidden_layers + 1)  # no forced exit
    inputs = (
        input_ids,
        batch["attention_mask"],
        batch["token_type_ids"],
        exit_plan,
        encode_settings(exit_threshold, replacement_mix),
    )
    return inputs, torch.zeros(1)


def _pipeline_module_class():
    """DeepSpeed's `PipelineModule`, also taking "layers:N0,N1,..." (`partition.py`) as a partition method."""
    from deepspeed.pipe import PipelineModule

    from .partition import is_layer_partition, parse_layer_counts

    class ExitPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):
            if not is_layer_partition(method):
                return super()._partition_layers(method)
            counts = parse_layer_counts(method, self.num_stages, len(self._layer_specs) - 1)
            # pipe layer 0 is EmbedAndCorrupt, on stage 0; then the discriminator layers in order
            self.parts = [0] + [1 + sum(counts[: stage + 1]) for stage in range(self.num_stages)]
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return ExitPipelineModule


def build_pipeline_module(
    config: ElectraExitConfig,
    num_stages: int,
    partition_method: str = "type:DiscriminatorLayerPipe",
    model: ElectraPreTrainingModel | None = None,
    **pipeline_kwargs,
):
    """A `deepspeed.pipe.PipelineModule` holding the same parameters as `ElectraPreTrainingModel`.

    Each process builds the whole model once on the CPU (for identical initial weights)
    and keeps only its stage's layers.
    """
    model = model or ElectraPreTrainingModel(config)
    counters = StageCounters()
    layers = [EmbedAndCorrupt(model)]
    layers += [
        DiscriminatorLayerPipe(model.discriminator, number, counters)
        for number in range(1, config.num_hidden_layers + 1)
    ]
    module = _pipeline_module_class()(
        layers=layers,
        num_stages=num_stages,
        loss_fn=PipelineLoss(config),
        partition_method=partition_method,
        **pipeline_kwargs,
    )
    module.stage_counters = counters
    local = [layer for layer in module.forward_funcs if isinstance(layer, DiscriminatorLayerPipe)]
    if local:
        local[0].first_of_stage = True
    if module.stage_id < module.num_stages - 1:
        module.forward_funcs[-1].joins_gradients = True
    # Each stage holds its own parameters, none replicated: mark them so that DeepSpeed's
    # fp32 ZeRO-0 gradient clipping (`runtime.utils.clip_grad_norm_`) counts every stage's
    # norm. Without it only the model-parallel rank 0 (stage 0) contributes, and every stage
    # clips by stage 0's norm alone. ZeRO-1 and bf16 already count every stage; the mark does
    # not change them.
    for parameter in module.parameters():
        parameter.model_parallel = True
    return module


def pipeline_state_dict_to_model(layer_states: dict[int, dict[str, torch.Tensor]], config: ElectraExitConfig):
    """Map per-layer pipeline weights (layer index -> state dict) to `ElectraPreTrainingModel` names."""
    merged: dict[str, torch.Tensor] = {}
    for index, state in layer_states.items():
        for name, tensor in state.items():
            if index == 0:
                for prefix, target in (
                    ("embeddings.", "discriminator.electra.embeddings."),
                    ("embeddings_project.", "discriminator.electra.embeddings_project."),
                    ("generator.", "generator."),
                    ("replacement_probs", "replacement_probs"),
                ):
                    if name.startswith(prefix):
                        merged[target + name[len(prefix) :]] = tensor
                continue
            if name.startswith("layer."):
                merged[f"discriminator.electra.encoder.layer.{index - 1}.{name[len('layer.') :]}"] = tensor
            elif name.startswith("head."):
                owner = (
                    "discriminator.discriminator_predictions"
                    if index == config.num_hidden_layers
                    else f"discriminator.exit_heads.{index}"
                )
                merged[f"{owner}.{name[len('head.') :]}"] = tensor
    return merged


def local_layer_states(module) -> dict[int, dict[str, torch.Tensor]]:
    """This stage's weights by pipeline layer index (DeepSpeed names a stage's layers by their global index)."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in module.state_dict().items():
        index, rest = name.split(".", 1)
        by_layer.setdefault(int(index), {})[rest] = tensor
    return by_layer


def gather_model_state_dict(module, contributes: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights under `ElectraPreTrainingModel` names, on every rank (a collective).

    Each stage holds some layers; the ranks with `contributes` (one replica of every stage) send
    theirs, as CPU copies, to all ranks. The config is the pipeline's own (`module.loss_fn.config`).
    """
    import torch.distributed as dist

    mine = (
        {
            index: {name: tensor.detach().cpu() for name, tensor in state.items()}
            for index, state in local_layer_states(module).items()
        }
        if contributes
        else {}
    )
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    layer_states = {index: state for stage in everyone for index, state in stage.items()}
    return pipeline_state_dict_to_model(layer_states, module.loss_fn.config)
