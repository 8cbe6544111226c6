"""Transformer building blocks, named as in Hugging Face `modeling_electra.py`.

Every module here mirrors its HF namesake parameter for parameter, so a state dict moves
between the two without renaming. The one difference is what a layer computes: an
`ElectraLayer` runs on the rows a `TokenRouting` selects (all positions, or only the
still-active tokens), so that compute falls with the number of active tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ElectraExitConfig

ACTIVATION_FUNCTIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def dropout(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout through the process's kernel slot (`kernels.py`: torch's own unless a platform set-up
    replaced it)."""
    return kernels.active.dropout(inputs, p, training)


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout` (the same module in every other respect)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return dropout(inputs, self.p, self.training)


@dataclass
class EncoderShape:
    """The sizes of one encoder stack (the discriminator's or the generator's)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def discriminator(cls, config: ElectraExitConfig) -> "EncoderShape":
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)

    @classmethod
    def generator(cls, config: ElectraExitConfig) -> "EncoderShape":
        return cls(
            config.generator_hidden_size,
            config.generator_num_hidden_layers,
            config.generator_num_attention_heads,
            config.generator_intermediate_size,
        )


@dataclass
class TokenRouting:
    """Which rows of a [B, T, H] batch a layer computes, and what its queries may attend to.

    `dense`: every position (padding included) is computed, exactly as HF does.
    Otherwise only the `row_index` rows (flattened b*T+t) are computed; their queries are
    laid out as [B, slots, H] at (`batch_index`, `slot_index`) for attention, and keys are
    either all real positions (`exit_kv="keep"`) or only the active tokens (`"drop"`).
    Rows move in and out of that layout through the flat index `slot_row` (b*slots+slot):
    `index_copy`/`index_select` on one dimension, whose backward passes are the cheap
    `index_select`/`index_add_` (a two-index `index_put` accumulates by sorting on CPU).
    """

    dense: bool
    key_mask: torch.Tensor | None  # bool [B, 1, 1, K]: which keys each sequence may attend to (None: all)
    row_index: torch.Tensor | None = None  # long [N]
    batch_index: torch.Tensor | None = None  # long [N]
    slot_index: torch.Tensor | None = None  # long [N]
    slots: int = 0
    drop_exited_keys: bool = False

    @property
    def slot_row(self) -> torch.Tensor:
        """long [N]: each routed row's place in the flattened [B * slots] query layout."""
        return self.batch_index * self.slots + self.slot_index

    @classmethod
    def all_positions(cls, attention_mask: torch.Tensor | None) -> "TokenRouting":
        return cls(dense=True, key_mask=_key_mask(attention_mask))

    @classmethod
    def active_tokens(
        cls, active: torch.Tensor, attention_mask: torch.Tensor | None, drop_exited_keys: bool
    ) -> "TokenRouting":
        """Route the `active` tokens (bool [B, T]); `attention_mask` masks keys under `keep` (None: no padding)."""
        batch, seq_len = active.shape
        row_index = active.reshape(-1).nonzero().squeeze(1)
        batch_index = torch.div(row_index, seq_len, rounding_mode="floor")
        # Slot of each active token within its own sequence: rank among the active ones.
        slot_of_position = active.long().cumsum(1) - 1
        slot_index = slot_of_position.reshape(-1).index_select(0, row_index)
        slots = int(active.sum(1).max()) if row_index.numel() else 0
        if drop_exited_keys:
            counts = active.sum(1, keepdim=True)
            key_mask = torch.arange(slots, device=active.device)[None, :] < counts
            # A sequence with no active token still needs one visible key, or its (unused)
            # padded query rows would produce NaN that leaks into the backward pass.
            if slots:
                key_mask[:, 0] = True
        else:
            return cls(
                dense=False,
                key_mask=_key_mask(attention_mask),
                row_index=row_index,
                batch_index=batch_index,
                slot_index=slot_index,
                slots=slots,
                drop_exited_keys=False,
            )
        return cls(
            dense=False,
            key_mask=key_mask[:, None, None, :],
            row_index=row_index,
            batch_index=batch_index,
            slot_index=slot_index,
            slots=slots,
            drop_exited_keys=drop_exited_keys,
        )

    @property
    def rows(self) -> int:
        return -1 if self.dense else int(self.row_index.numel())


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [B, 1, 1, T] key mask, or None for a batch without padding (the caller knows that from
    the batch on the host, and passes no mask): attention then runs its fused unmasked kernel, as
    HF's SDPA path does. Same values either way; deciding here would read the device."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


class ElectraEmbeddings(nn.Module):
    """Word, position and token-type embeddings (shared by generator and discriminator)."""

    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)[None]
        )
        return self.dropout(self.LayerNorm(embeddings))


class ElectraSelfAttention(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.num_heads = shape.num_heads
        self.head_size = shape.hidden_size // shape.num_heads
        self.query = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.key = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.value = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        query, key, value = self._heads(query), self._heads(key), self._heads(value)
        drop = self.dropout_prob if self.training else 0.0
        context = kernels.active.attention(query, key, value, key_mask, drop)
        batch, heads, length, head_size = context.shape
        return context.transpose(1, 2).reshape(batch, length, heads * head_size)

    def _projected(self, inputs: torch.Tensor, *projections: nn.Linear) -> tuple[torch.Tensor, ...]:
        """Several projections of the same inputs as one matmul (weights concatenated on the fly: the
        parameters keep HF's names and shapes), split back into one tensor each."""
        return self._joined(inputs, *projections).split(projections[0].out_features, dim=-1)

    @staticmethod
    def _joined(inputs: torch.Tensor, *projections: nn.Linear) -> torch.Tensor:
        """The projections' outputs side by side in the last dimension, from one matmul."""
        if len(projections) == 1:
            return projections[0](inputs)
        weight = torch.cat([projection.weight for projection in projections])
        bias = torch.cat([projection.bias for projection in projections])
        return F.linear(inputs, weight, bias)

    def queries_at(self, hidden: torch.Tensor, queries: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Context vectors [B*S, H] for `queries` ([B, S, H]: states of S positions per sequence)
        attending to every position of `hidden` ([B, T, H])."""
        key, value = self._projected(hidden, self.key, self.value)
        context = self._attend(self.query(queries), key, value, key_mask)
        return context.reshape(-1, context.shape[-1])

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
        """Context vectors for the routed rows: [B*T, H] when dense, [N, H] otherwise."""
        if routing.dense:
            context = self._attend(*self._projected(hidden, self.query, self.key, self.value), routing.key_mask)
            return context.reshape(-1, context.shape[-1])
        batch, hidden_size = hidden.shape[0], hidden.shape[2]

        slot_row = routing.slot_row

        def to_slots(row_values: torch.Tensor) -> torch.Tensor:
            # In place on fresh zeros: no copy of them (an out-of-place `index_copy` clones its input).
            width = row_values.shape[-1]
            slotted = row_values.new_zeros(batch * routing.slots, width)
            return slotted.index_copy_(0, slot_row, row_values).view(batch, routing.slots, width)

        if routing.drop_exited_keys:
            # Query, key and value into the slot layout together: one scatter.
            query, key, value = to_slots(self._joined(rows, self.query, self.key, self.value)).split(
                hidden_size, dim=-1
            )
        else:
            # Exited tokens stay visible: their frozen states still serve as keys/values.
            query = to_slots(self.query(rows))
            key, value = self._projected(hidden, self.key, self.value)
        context = self._attend(query, key, value, routing.key_mask)
        return context.reshape(batch * routing.slots, hidden_size).index_select(0, slot_row)


class ElectraSelfOutput(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class ElectraAttention(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.self = ElectraSelfAttention(shape, config)
        self.output = ElectraSelfOutput(shape, config)


class ElectraIntermediate(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.intermediate_size)
        self.intermediate_act_fn = ACTIVATION_FUNCTIONS[config.hidden_act]()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class ElectraOutput(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.dense = nn.Linear(shape.intermediate_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class ElectraLayer(nn.Module):
    """One post-LN transformer layer that computes only the rows its routing selects."""

    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.attention = ElectraAttention(shape, config)
        self.intermediate = ElectraIntermediate(shape, config)
        self.output = ElectraOutput(shape, config)

    def forward(
        self,
        hidden: torch.Tensor,
        routing: TokenRouting,
        rows: torch.Tensor | None = None,
        prefix: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the new [B, T, H] states, the rows computed: [B*T, H] when dense, else [N, H] in `row_index`
        order), so that a head reading those rows need not gather them again. (HF's layer returns a
        tuple too.) A caller that holds the routed rows' current states passes them as `rows`: the new
        ones are then not written into `hidden` (None in their place), and `hidden` is read only for
        keys and values that exited tokens keep (`exit_kv="keep"`).

        `prefix` (capacity routing under `exit_kv="keep"`): only each sequence's first `prefix` rows are
        computed, [B*prefix, H], their queries attending to every row of `hidden` (the rows that left
        follow the running ones with their frozen states); None in place of the new states."""
        if prefix is not None:
            return None, self._queries_of(hidden, hidden[:, :prefix], routing.key_mask)
        batch, seq_len, hidden_size = hidden.shape
        flat = hidden.reshape(batch * seq_len, hidden_size)
        holding = rows is not None
        if not holding:
            rows = flat if routing.dense else flat.index_select(0, routing.row_index)
        context = self.attention.self(hidden, rows, routing)
        attended = self.attention.output(context, rows)
        updated = self.output(self.intermediate(attended), attended)
        if holding:
            return None, updated
        if routing.dense:
            return updated.view(batch, seq_len, hidden_size), updated
        # Rows not routed keep their state: exited tokens are frozen.
        return flat.index_copy(0, routing.row_index, updated).view(batch, seq_len, hidden_size), updated

    def at_positions(
        self, hidden: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The new states [B*S, H] of the positions `positions` (long [B, S]) only: their queries attend
        to every position's keys and values. A fixed [B, S] layout, whatever the positions are (the
        generator's last layer computes the masked slots this way)."""
        selected = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self._queries_of(hidden, selected, _key_mask(attention_mask))

    def _queries_of(self, hidden: torch.Tensor, selected: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """New states [B*S, H] of `selected` ([B, S, H]), their queries attending to every row of `hidden`."""
        context = self.attention.self.queries_at(hidden, selected, key_mask)
        attended = self.attention.output(context, selected.reshape(-1, selected.shape[-1]))
        return self.output(self.intermediate(attended), attended)


class ElectraEncoder(nn.Module):
    def __init__(self, shape: EncoderShape, config: ElectraExitConfig):
        super().__init__()
        self.layer = nn.ModuleList(ElectraLayer(shape, config) for _ in range(shape.num_layers))


class ElectraDiscriminatorPredictions(nn.Module):
    """Replaced-token-detection head: dense H->H, activation, dense H->1. Also the exit head."""

    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATION_FUNCTIONS[config.hidden_act]()
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(self.activation(self.dense(hidden))).squeeze(-1)


class LinearExitHead(nn.Module):
    """The cheap exit head (`exit_head="linear"`): one dense H->1 on the layer's hidden state."""

    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(hidden).squeeze(-1)


def build_exit_head(config: ElectraExitConfig) -> nn.Module:
    return LinearExitHead(config) if config.exit_head == "linear" else ElectraDiscriminatorPredictions(config)


class ElectraGeneratorPredictions(nn.Module):
    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.activation = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.generator_hidden_size, config.embedding_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.activation(self.dense(hidden)))


def init_weights(module: nn.Module, initializer_range: float) -> None:
    """BERT/ELECTRA initialisation: normal(0, range) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
