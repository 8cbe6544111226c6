"""ELECTRA pre-training: masking, replacement sampling, and the combined loss.

`ElectraPreTrainingModel` owns the generator (or a fixed replacement distribution for
the `uniform` / `unigram` generator study), the early-exit discriminator, and the loss:
generator MLM + disc_weight x ((1 - a) x RTD + a x mean exit-head RTD), a = aux_weight when
the model has exit heads, 0 without (`objective_loss`), computed for the model and the
pipeline's last stage alike by `loss_and_statistics`. Randomness
(masking, sampling) comes from torch's default generator, so a checkpoint that saves
torch's RNG state resumes the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capacity import CapacitySchedule, capacity_schedule
from .config import ElectraExitConfig
from .discriminator import ElectraDiscriminator, ExitDecision, ExitState, exitable_tokens
from .flops import ComputeLog, FlopReport, count_flops, mean_exit_layer
from .generator import ElectraGenerator
from .layers import init_weights


@dataclass
class PreTrainingOutput:
    loss: torch.Tensor
    generator_loss: torch.Tensor
    discriminator_loss: torch.Tensor
    aux_loss: torch.Tensor
    rtd_accuracy: torch.Tensor
    discriminator_logits: torch.Tensor  # [B, T]
    rtd_labels: torch.Tensor  # [B, T] float
    exit_layer: torch.Tensor  # [B, T] long, 0 on padding
    exit_layer_counts: torch.Tensor  # [num_layers] long: real tokens whose last layer is l+1
    flops: FlopReport
    compute_log: ComputeLog
    forced_exits: torch.Tensor | int = 0  # long: capacity routing: exitable tokens that left below `min_confidence`
    floor_counts: torch.Tensor | None = None  # capacity routing: `ExitState.floor_counts_by_layer`

    @property
    def tokens_executed(self) -> int:
        return self.flops.token_layers_executed

    @property
    def tokens_full(self) -> int:
        return self.flops.token_layers_full

    @property
    def compute_fraction(self) -> float:
        return self.flops.compute_fraction

    @property
    def mean_exit_layer(self) -> float:
        return mean_exit_layer(self.exit_layer_counts.tolist())


_SAMPLING_BLOCK = 128  # vocabulary entries per block of `CorruptionMixin.sample_from_probs`


class MaskedLMLoss(torch.autograd.Function):
    """Weighted cross-entropy, sum over rows of `weights` x -log softmax(logits)[target], that also
    returns softmax(logits), detached. `weights` is 1 / (valid rows) on the masked slots that hold a
    token and 0 on the slots past a sequence's count, so the loss is the mean over masked tokens.

    The generator's vocabulary tail is [slots, 30,522] wide, and sampling needs the same softmax the
    loss takes: computed once here, kept as the backward's saved tensor, whose gradient is
    weights x (softmax - one-hot) in one pass. (Cross-entropy, a second softmax for sampling and
    cross-entropy's two-kernel backward each make a full pass over that tensor.)
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = torch.log_softmax(logits, dim=-1)
        loss = -(log_probs.gather(1, targets[:, None]).squeeze(1) * weights).sum()
        probs = log_probs.exp_()
        ctx.save_for_backward(probs, targets, weights)
        ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)  # no gradient for the loss: none for the logits either
        return loss, probs

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None, _grad_probs: torch.Tensor | None):
        if grad_loss is None:
            return None, None, None
        probs, targets, weights = ctx.saved_tensors
        scale = (grad_loss * weights)[:, None]
        grad = probs * scale
        # One entry per row: a plain scatter of (its value - the row's scale), not an accumulating one.
        at_target = grad.gather(1, targets[:, None]) - scale
        return grad.scatter_(1, targets[:, None], at_target), None, None


@dataclass
class MaskedSlots:
    """A batch's masked positions in a fixed [batch, slots] layout (google-research/electra's
    `max_predictions_per_seq`): every sequence has `slots` entries; those past its own count are
    not masked (`valid` False) and point at other, distinct positions of the sequence."""

    positions: torch.Tensor  # long [B, S]: position within the sequence
    valid: torch.Tensor  # bool [B, S]: the slot holds a masked token

    def flat(self, seq_len: int) -> torch.Tensor:
        """long [B*S]: the slots' flat positions (b*T + t), all distinct."""
        batch = self.positions.shape[0]
        offsets = torch.arange(batch, device=self.positions.device)[:, None] * seq_len
        return (self.positions + offsets).reshape(-1)

    def weights(self) -> torch.Tensor:
        """float [B*S]: 1 / (masked tokens) on valid slots, 0 elsewhere (a mean over masked tokens)."""
        valid = self.valid.reshape(-1).float()
        return valid / valid.sum().clamp(min=1.0)

    @classmethod
    def from_mask(cls, masked: torch.Tensor) -> "MaskedSlots":
        """The slots of a given bool [B, T] mask, each sequence's positions in ascending order (reads the
        device for the largest count: evaluation and tests, not the training step)."""
        seq_len = masked.shape[1]
        slots = max(1, int(masked.sum(1).max()))
        # Masked positions first, in ascending order, then the others: a key per position.
        order_key = masked.float() * 2 * seq_len - torch.arange(seq_len, device=masked.device)
        positions = order_key.topk(slots, dim=1).indices
        return cls(positions, masked.gather(1, positions))


class CorruptionMixin:
    """Masking, the generator's MLM loss and replacement sampling.

    Shared by `ElectraPreTrainingModel` and the pipeline's first stage; needs the
    attributes `config`, `generator` (or None), `embeddings`, `special_token_ids` and
    `replacement_probs`.
    """

    def choose_masked_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> MaskedSlots:
        """An exact count per sequence, as google-research/electra: min(slots, max(1, round(mask_prob x
        candidates))) of its real, non-special tokens, the top-k of uniform random keys over them,
        in a [batch, slots] layout (`config.masked_slots`). Static shapes, no read of the device."""
        batch, seq_len = input_ids.shape
        candidates = ~torch.isin(input_ids, self.special_token_ids)
        if attention_mask is not None:
            candidates &= attention_mask.bool()
        slots = self.config.masked_slots(seq_len)
        available = candidates.sum(1)
        count = torch.round(available * self.config.mask_prob).clamp_(min=1, max=slots)
        count = torch.minimum(count, available)
        keys = torch.rand(input_ids.shape, device=input_ids.device).masked_fill_(~candidates, -1.0)
        positions = keys.topk(slots, dim=1).indices
        return MaskedSlots(positions, torch.arange(slots, device=input_ids.device) < count[:, None])

    @staticmethod
    def sample_from_logits(
        logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One draw from softmax(logits / temperature) per row (`sample_from_probs`)."""
        return CorruptionMixin.sample_from_probs(
            torch.softmax(logits.detach().float() / temperature, dim=-1), generator
        )

    @staticmethod
    def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw per row of `probs` (rows need not sum to 1), by the inverse CDF: one uniform number
        per row. (Gumbel-max needs one per vocabulary entry, 30,522 per masked token, two logarithms
        each; torch.multinomial draws an exponential per entry.) The CDF is taken in two levels: over
        blocks of `_SAMPLING_BLOCK` entries, then within the one block the draw falls in, so the
        [rows, vocabulary] tensor is read once (a cumulative sum over all of it reads and writes it)."""
        rows, width = probs.shape
        if rows == 0:
            return torch.zeros(0, dtype=torch.long, device=probs.device)
        block = _SAMPLING_BLOCK
        full = width - width % block
        block_sums = probs[:, :full].view(rows, full // block, block).sum(-1)
        if full < width:
            block_sums = torch.cat([block_sums, probs[:, full:].sum(-1, keepdim=True)], dim=1)
        block_cdf = block_sums.cumsum(-1)
        target = torch.rand(rows, 1, device=probs.device, generator=generator) * block_cdf[:, -1:]
        chosen = torch.searchsorted(block_cdf, target).clamp_(max=block_cdf.shape[1] - 1)
        before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp_(min=0)), 0.0)
        entries = chosen * block + torch.arange(block, device=probs.device)
        inside = entries < width  # the last block may be short
        within_cdf = torch.where(inside, probs.gather(1, entries.clamp(max=width - 1)), 0.0).cumsum(-1)
        # The block sums and the cumulative sum within the block add in different orders: keep the
        # target inside the block it was drawn in.
        within_target = torch.minimum(target - before, within_cdf[:, -1:])
        offset = torch.searchsorted(within_cdf, within_target).clamp_(max=block - 1)
        return (chosen * block + offset).squeeze(-1).clamp_(max=width - 1)

    def sample_fixed(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`count` draws from the fixed replacement distribution (uniform or unigram)."""
        if count == 0:
            return torch.zeros(0, dtype=torch.long, device=self.replacement_probs.device)
        return torch.multinomial(self.replacement_probs, count, replacement=True, generator=generator)

    def corrupt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor,
        log: ComputeLog | None = None,
        replacement_mix: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(corrupted ids, RTD labels as float, generator MLM loss) for one batch.

        `replacement_mix` (default: the config's value at step 0) is the share of masked
        positions replaced from the fixed distribution rather than by the generator; a tensor
        (the trainer's per-step value) keeps one compiled graph for every step.
        """
        slots = self.choose_masked_positions(input_ids, attention_mask)
        flat_positions = slots.flat(input_ids.shape[1])
        valid = slots.valid.reshape(-1)
        flat_ids = input_ids.reshape(-1)
        originals = flat_ids.index_select(0, flat_positions)
        if self.generator is not None:
            masked_ids = torch.where(valid, self.config.mask_token_id, originals)
            generator_input = flat_ids.index_copy(0, flat_positions, masked_ids).view_as(input_ids)
            generator_logits = self.generator(
                self.embeddings,
                generator_input,
                attention_mask,
                token_type_ids,
                positions=slots.positions,
                work=log.generator if log is not None else None,
            ).float()
            if log is not None:
                log.generator_head_rows = flat_positions.numel()
            generator_loss, probs = MaskedLMLoss.apply(generator_logits, originals, slots.weights())
            temperature = self.config.generator_temperature
            replacements = (
                self.sample_from_probs(probs)
                if temperature == 1.0
                else self.sample_from_logits(generator_logits, temperature)
            )
            mix = self.config.replacement_mix if replacement_mix is None else replacement_mix
            if isinstance(mix, torch.Tensor) or mix > 0:
                from_fixed = torch.rand(valid.shape, device=input_ids.device) < mix
                replacements = torch.where(from_fixed, self.sample_fixed(valid.numel()), replacements)
        else:
            generator_loss = torch.zeros((), device=input_ids.device)
            replacements = self.sample_fixed(valid.numel())
        # Slots past a sequence's count write back the token they hold: nothing changes there.
        written = torch.where(valid, replacements, originals)
        corrupted = flat_ids.index_copy(0, flat_positions, written).view_as(input_ids)
        # A sampled token equal to the original counts as original.
        return corrupted, (corrupted != input_ids).float(), generator_loss


def objective_loss(
    config: ElectraExitConfig,
    generator_loss: torch.Tensor,
    discriminator_loss: torch.Tensor,
    mean_exit_head_loss: torch.Tensor,
) -> torch.Tensor:
    """generator + disc_weight x ((1 - a) x final RTD + a x mean exit-head RTD).

    The exit heads take a share a = aux_weight of the discriminator term instead of adding to
    it, so the generator's share of the loss (and, under gradient clipping, the balance between
    generator and discriminator) is the same for a model with exits as for one without.
    """
    share = config.aux_weight if config.exit_layers else 0.0
    discriminator_term = (1.0 - share) * discriminator_loss + share * mean_exit_head_loss
    return generator_loss + config.disc_weight * discriminator_term


@dataclass
class LossAndStatistics:
    """The objective of one micro-batch and what the trainer's step statistics read from it."""

    loss: torch.Tensor  # with its graph
    generator_loss: torch.Tensor
    discriminator_loss: torch.Tensor
    aux_loss: torch.Tensor  # mean exit-head RTD loss
    rtd_accuracy: torch.Tensor
    exit_layer_counts: torch.Tensor  # [num_layers] long: real tokens whose last layer is l+1


def loss_and_statistics(
    config: ElectraExitConfig, state: ExitState, rtd_labels: torch.Tensor, generator_loss: torch.Tensor
) -> LossAndStatistics:
    """The one loss: used by `ElectraPreTrainingModel` and by the pipeline's last stage.

    `state` is the discriminator's state after its last layer (every logit set, `aux_loss` the
    sum over exit heads of their mean RTD loss).
    """
    real = state.attention_mask.float()
    real_count = real.sum().clamp(min=1.0)
    # Means over real tokens as masked sums: static shapes, no boolean indexing.
    per_token = F.binary_cross_entropy_with_logits(state.logits, rtd_labels, reduction="none")
    discriminator_loss = (per_token * real).sum() / real_count
    aux_loss = state.aux_loss / max(1, len(config.exit_layers))
    loss = objective_loss(config, generator_loss, discriminator_loss, aux_loss)
    with torch.no_grad():
        correct = ((state.logits > 0).float() == rtd_labels).float()
        rtd_accuracy = (correct * real).sum() / real_count
        counts = torch.zeros(config.num_hidden_layers + 1, dtype=torch.long, device=real.device)
        counts = counts.scatter_add_(0, state.exit_layer.reshape(-1), state.attention_mask.reshape(-1).long())[1:]
    return LossAndStatistics(
        loss=loss,
        generator_loss=generator_loss.detach(),
        discriminator_loss=discriminator_loss.detach(),
        aux_loss=aux_loss.detach(),
        rtd_accuracy=rtd_accuracy,
        exit_layer_counts=counts,
    )


def register_replacement_buffers(module: nn.Module, config: ElectraExitConfig) -> None:
    special = torch.tensor([config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id])
    module.register_buffer("special_token_ids", special, persistent=False)
    # Replacement distribution for the generator-free study (uniform / unigram).
    probs = torch.ones(config.vocab_size)
    probs[special] = 0.0
    module.register_buffer("replacement_probs", probs / probs.sum())


class ElectraPreTrainingModel(CorruptionMixin, nn.Module):
    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.config = config
        self.discriminator = ElectraDiscriminator(config)
        self.generator = ElectraGenerator(config) if config.uses_generator_network else None
        register_replacement_buffers(self, config)
        # Exit heads draw their weights after every other module, so a model with exits starts from the
        # same weights as one without under the same seed: arms of a seed differ only by their exits.
        exit_head_modules = set(self.discriminator.exit_heads.modules())
        self.apply(
            lambda module: None if module in exit_head_modules else init_weights(module, config.initializer_range)
        )
        self.discriminator.exit_heads.apply(lambda module: init_weights(module, config.initializer_range))
        if config.head_bias_init == "prior":
            self.discriminator.init_head_bias_at_prior()

    @property
    def embeddings(self):
        return self.discriminator.electra.embeddings

    def set_unigram_counts(self, counts: torch.Tensor) -> None:
        """Token frequencies for `generator="unigram"` (specials never drawn)."""
        if counts.shape != (self.config.vocab_size,):
            raise ValueError(
                f"unigram counts have shape {tuple(counts.shape)}; expected "
                f"({self.config.vocab_size},), one count per vocabulary entry."
            )
        probs = counts.double().clamp(min=0)
        probs[self.special_token_ids.cpu()] = 0
        if probs.sum() <= 0:
            raise ValueError("unigram counts are all zero outside special tokens; expected corpus frequencies.")
        self.replacement_probs.copy_((probs / probs.sum()).to(self.replacement_probs))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        exit_threshold: float | None = None,
        exit_plan: torch.Tensor | None = None,
        replacement_mix: float | None = None,
        exit_capacity: int | Mapping[int, float] | CapacitySchedule | None = None,
        min_confidence: float = 0.0,
    ) -> PreTrainingOutput:
        """`attention_mask` None: the batch has no padding (attention then runs unmasked; the trainer
        knows this from the batch on the host). Per-step values (`exit_threshold`, `replacement_mix`)
        may be device tensors: one compiled graph serves every step.

        `exit_capacity` routes by capacity instead of a threshold (`capacity.py`): the controller's level
        (1-16), or the share of the sequence that continues after named exit layers; Python values, one
        compiled graph per schedule. `min_confidence` is the floor its forced exits are counted against."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        exitable = exitable_tokens(input_ids, attention_mask, self.config)
        log = ComputeLog(
            batch_size=input_ids.shape[0],
            seq_len=input_ids.shape[1],
            real_tokens=input_ids.numel() if attention_mask is None else attention_mask.sum(),
            exitable_tokens=exitable.sum(),
        )
        corrupted, rtd_labels, generator_loss = self.corrupt(
            input_ids, attention_mask, token_type_ids, log, replacement_mix
        )
        decision = ExitDecision.for_config(
            self.config,
            threshold=exit_threshold,
            plan=exit_plan,
            capacity=None if exit_capacity is None else capacity_schedule(self.config, exit_capacity),
            min_confidence=min_confidence,
        )
        state = self.discriminator(
            corrupted, attention_mask, token_type_ids, labels=rtd_labels, decision=decision, exitable=exitable
        )
        log.discriminator = state.work
        return self._finish(state, rtd_labels, generator_loss, log)

    def _finish(
        self, state: ExitState, rtd_labels: torch.Tensor, generator_loss: torch.Tensor, log: ComputeLog
    ) -> PreTrainingOutput:
        result = loss_and_statistics(self.config, state, rtd_labels, generator_loss)
        return PreTrainingOutput(
            loss=result.loss,
            generator_loss=result.generator_loss,
            discriminator_loss=result.discriminator_loss,
            aux_loss=result.aux_loss,
            rtd_accuracy=result.rtd_accuracy,
            discriminator_logits=state.logits,
            rtd_labels=rtd_labels,
            exit_layer=state.exit_layer,
            exit_layer_counts=result.exit_layer_counts,
            flops=count_flops(log, self.config),
            compute_log=log,
            forced_exits=state.forced_exits,
            floor_counts=state.floor_counts_by_layer(self.config.num_hidden_layers),
        )
