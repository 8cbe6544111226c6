"""The ELECTRA discriminator with token-level early exit.

After each layer that carries an exit head, every still-active token gets a replaced-token
logit from that head, and the routing decides which tokens exit: threshold routing
(`threshold.py`) lets a token go when its confidence under the exit rule (`exit_rules/`)
reaches this step's tau; capacity routing (`capacity.py`) keeps a fixed number of the least
confident rows per sequence and lets the others go. An exited token's RTD logit is the head's,
and its hidden state is frozen and carried to the output. Later layers compute new states only
for the tokens still running. Pinned tokens ([CLS], [SEP] by default) never exit on their own
confidence: under a threshold they leave with their sequence's last exitable token
(`pinned_leaving`), so a sequence whose tokens all exited has no active token left, and a
pipeline stage can skip a micro-batch of such sequences; under a capacity they continue first.
Every layer and head is called on every forward, with zero rows if need be, so that ZeRO-3's
parameter gathering sees the same module sequence on every rank.

The forward pass is split into `embed` and `run_layer` over an `ExitState`, so a pipeline stage
can run any contiguous range of layers on the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .capacity import CapacitySchedule, PrefixRows, run_capacity_layer
from .config import ElectraExitConfig
from .exit_rules import Confidence, ExitRule, build_exit_rule
from .flops import LayerWork
from .layers import (
    ElectraDiscriminatorPredictions,
    ElectraEmbeddings,
    ElectraEncoder,
    EncoderShape,
    build_exit_head,
)
from .threshold import pinned_leaving, run_threshold_layer


@dataclass
class RowStates:
    """The newest hidden states of some tokens: `states[i]` belongs at flat position `index[i]` (b*T+t)."""

    index: torch.Tensor  # long [N], ascending
    states: torch.Tensor  # [N, H]


@dataclass
class ExitState:
    """The discriminator's running state between layers (all tensors [B, T] unless noted).

    Under `exit_kv="drop"` no later layer reads an exited token's state, so a routed layer's new rows
    are not written into the [B, T, H] states at once (a full-size copy forward and backward, every
    layer): they are `carried` straight into the next layer, and the rows of tokens that exit wait in
    `deferred`. Reading `hidden` writes them all in one scatter; training, which reads only logits,
    never does.
    """

    stored_hidden: torch.Tensor  # [B, T, H] as last written (`hidden` adds what is deferred and carried)
    attention_mask: torch.Tensor  # bool: real (non-padding) positions
    active: torch.Tensor  # bool: real tokens that have not exited
    logits: torch.Tensor  # RTD logit of each token that has exited (0 elsewhere until the end)
    exit_layer: torch.Tensor  # long: layer number a token exited after (0: still active)
    aux_loss: torch.Tensor  # scalar: sum over exit heads of their mean RTD loss
    exitable: torch.Tensor  # bool: real tokens that exit on their own confidence (pinned specials excluded)
    labels: torch.Tensor | None = None  # float: 1 where the token was replaced
    # bool: real positions, or None when the batch has no padding (attention runs unmasked then)
    padding_mask: torch.Tensor | None = None
    # False until a head has run with a rule that may let tokens exit: until then every layer is
    # dense without looking at the device
    exits_possible: bool = True
    work: list[LayerWork] = field(default_factory=list)
    deferred: list[RowStates] = field(default_factory=list)  # exited tokens' final states, not yet written
    carried: RowStates | None = None  # the newest states of the tokens active when it was set
    carried_for: torch.Tensor | None = None  # the `active` mask `carried` holds the rows of
    prefix: PrefixRows | None = None  # capacity routing: every row in slot order, from the first exit head on
    forced_exits: torch.Tensor | int = 0  # capacity routing: exitable tokens that left below the floor
    # capacity routing, per exit layer: (exitable tokens reaching its head below the floor so far, those
    # of them at or above it there)
    floor_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        exitable: torch.Tensor | None = None,
    ) -> "ExitState":
        """The state entering layer 1: every real token active, nothing exited yet. `attention_mask`
        None: no padding."""
        shape = hidden.shape[:2]
        padding_mask = None if attention_mask is None else attention_mask.bool()
        real = torch.ones(shape, dtype=torch.bool, device=hidden.device) if padding_mask is None else padding_mask
        return cls(
            stored_hidden=hidden,
            attention_mask=real,
            active=real.clone(),
            logits=hidden.new_zeros(shape, dtype=torch.float32),
            exit_layer=torch.zeros(shape, dtype=torch.long, device=hidden.device),
            aux_loss=hidden.new_zeros((), dtype=torch.float32),
            forced_exits=torch.zeros((), dtype=torch.long, device=hidden.device),
            exitable=real.clone() if exitable is None else exitable.bool() & real,
            labels=labels,
            padding_mask=padding_mask,
            exits_possible=False,
        )

    @property
    def hidden(self) -> torch.Tensor:
        """[B, T, H]: every token's newest state (exited tokens' frozen at their exit)."""
        if self.prefix is not None:
            return self.prefix.sequence_hidden
        updates = self.deferred + ([self.carried] if self.carried is not None else [])
        if updates:
            batch, seq_len, width = self.stored_hidden.shape
            index = torch.cat([update.index for update in updates])
            states = torch.cat([update.states for update in updates])
            flat = self.stored_hidden.reshape(batch * seq_len, width)
            self.stored_hidden = flat.index_copy(0, index, states).view(batch, seq_len, width)
            self.deferred, self.carried, self.carried_for = [], None, None
        return self.stored_hidden

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self.stored_hidden, self.deferred, self.carried, self.carried_for = value, [], None, None

    def floor_counts_by_layer(self, num_layers: int) -> torch.Tensor:
        """float [2, num_layers]: `floor_counts` at index layer - 1 (zero where no count was taken)."""
        counts = torch.zeros(2, num_layers, device=self.attention_mask.device)
        for number, (reaching, confident) in self.floor_counts.items():
            counts[:, number - 1] = torch.stack([reaching, confident]).float()
        return counts

    def carry(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """Hold `states` as the newest states of the active tokens (flat positions `index`)."""
        self.carried, self.carried_for = RowStates(index, states), self.active

    @property
    def carries_active(self) -> bool:
        return self.carried is not None and self.carried_for is self.active

    def active_rows(self, row_index: torch.Tensor) -> torch.Tensor:
        """The active tokens' states, [N, H] in flat order (`row_index`: their flat positions)."""
        if self.carries_active:
            return self.carried.states
        hidden = self.hidden
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, row_index)

    def retire(self, exiting: torch.Tensor, active: torch.Tensor) -> None:
        """The carried tokens at `exiting` (bool over the carried rows) leave, and `active` (the mask
        without them) becomes the active mask: their rows wait in `deferred`, the others stay carried."""
        staying = (~exiting).nonzero().squeeze(1)
        leaving = exiting.nonzero().squeeze(1)
        carried = self.carried
        self.deferred.append(RowStates(carried.index[leaving], carried.states.index_select(0, leaving)))
        self.active = active
        self.carry(carried.index[staying], carried.states.index_select(0, staying))

    @property
    def dense(self) -> bool:
        """True while no real token has exited: layers then compute every position, as HF. Known
        without reading the device until a head could let tokens go (threshold or plan)."""
        return not self.exits_possible or bool(torch.equal(self.active, self.attention_mask))


def exitable_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, config: ElectraExitConfig) -> torch.Tensor:
    """Real tokens that exit on their own confidence under a threshold: all but the pinned specials
    (`attention_mask` None: every position is real)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pinned = config.pinned_token_ids
    if not pinned:
        return real
    return real & ~torch.isin(input_ids, torch.tensor(pinned, device=input_ids.device))


@dataclass
class ExitDecision:
    """How tokens leave: a threshold under an exit rule (`exit_rules/`), a capacity schedule (`capacity.py`),
    or a forced per-token exit layer.

    A forced plan is absolute (pinned tokens follow it too: benchmarks use it to fix the
    work); a threshold applies to exitable tokens, and pinned tokens leave with their
    sequence's last exitable token (`pinned_leaving`); under a capacity schedule pinned tokens
    continue before any exitable one. `min_confidence` is the floor capacity routing measures
    its exits against (`ExitState.forced_exits`); it decides nothing.
    """

    threshold: float | None = None
    plan: torch.Tensor | None = None  # long [B, T]: exit after this layer (>= num layers: never)
    rule: ExitRule = field(default_factory=Confidence)  # `for_config` takes the model's rule
    capacity: CapacitySchedule | None = None
    random: bool = False  # capacity routing draws the continuing rows at random (`exit_routing="random"`)
    min_confidence: float = 0.0

    @classmethod
    def for_config(
        cls,
        config: ElectraExitConfig,
        threshold: float | None = None,
        plan: torch.Tensor | None = None,
        capacity: CapacitySchedule | None = None,
        min_confidence: float = 0.0,
    ) -> "ExitDecision":
        if sum(choice is not None for choice in (threshold, plan, capacity)) > 1:
            raise ValueError("an exit decision takes one of a threshold, an exit plan or a capacity schedule.")
        return cls(
            threshold=threshold,
            plan=plan,
            rule=build_exit_rule(config),
            capacity=capacity,
            random=config.exit_routing == "random",
            min_confidence=min_confidence,
        )

    @property
    def may_exit(self) -> bool:
        return self.plan is not None or self.threshold is not None or self.capacity is not None

    def exits(
        self, layer_number: int, head_logits: torch.Tensor, rows: torch.Tensor, exitable: torch.Tensor
    ) -> torch.Tensor:
        if self.plan is not None:
            return self.plan.reshape(-1).index_select(0, rows) <= layer_number
        if self.threshold is None:
            return torch.zeros_like(head_logits, dtype=torch.bool)
        exitable_rows = exitable.reshape(-1).index_select(0, rows)
        exits = (self.rule.confidence(head_logits, layer_number) >= self.threshold) & exitable_rows
        return exits | pinned_leaving(exits, rows, exitable_rows, exitable.shape)


class ElectraBody(nn.Module):
    """HF's `ElectraModel` attribute layout: embeddings, optional projection, encoder."""

    def __init__(self, config: ElectraExitConfig, shape: EncoderShape, embeddings: ElectraEmbeddings | None):
        super().__init__()
        if embeddings is not None:
            self.embeddings = embeddings
        if config.embedding_size != shape.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, shape.hidden_size)
        self.encoder = ElectraEncoder(shape, config)

    def project(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.embeddings_project(embedded) if hasattr(self, "embeddings_project") else embedded


class ElectraDiscriminator(nn.Module):
    """Parameter names equal `transformers.ElectraForPreTraining`'s, plus `exit_heads.*`."""

    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraBody(config, EncoderShape.discriminator(config), ElectraEmbeddings(config))
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        # Built on a forked RNG, so the modules after them draw the same construction-time numbers with
        # and without exits (ElectraPreTrainingModel initialises the heads last for the same reason).
        with torch.random.fork_rng(devices=[]):
            self.exit_heads = nn.ModuleDict({str(number): build_exit_head(config) for number in config.exit_layers})

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @torch.no_grad()
    def init_head_bias_at_prior(self) -> None:
        """Start every RTD head at the replacement rate's log-odds (see `head_bias_init`)."""
        prior_logit = math.log(self.config.mask_prob / (1.0 - self.config.mask_prob))
        for head in (self.discriminator_predictions, *self.exit_heads.values()):
            head.dense_prediction.bias.fill_(prior_logit)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        exitable: torch.Tensor | None = None,
    ) -> ExitState:
        """`exitable` defaults to the non-pinned real tokens of `input_ids`; pre-training passes the
        mask of the uncorrupted ids (a generator may sample a special token as a replacement)."""
        hidden = self.electra.project(self.electra.embeddings(input_ids, token_type_ids))
        if exitable is None:
            exitable = exitable_tokens(input_ids, attention_mask, self.config)
        return ExitState.start(hidden, attention_mask, labels, exitable)

    def head_for(self, layer_number: int) -> nn.Module | None:
        """The head read after layer `layer_number`: an exit head, the final head, or none."""
        if layer_number == self.num_layers:
            return self.discriminator_predictions
        return self.exit_heads[str(layer_number)] if str(layer_number) in self.exit_heads else None

    def run_layer(self, layer_number: int, state: ExitState, decision: ExitDecision) -> ExitState:
        """Run layer `layer_number` (1-based) and its head on the active tokens of `state`."""
        return run_exit_layer(
            self.electra.encoder.layer[layer_number - 1],
            self.head_for(layer_number),
            layer_number,
            self.config,
            state,
            decision,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        decision: ExitDecision | None = None,
        exitable: torch.Tensor | None = None,
    ) -> ExitState:
        decision = decision or ExitDecision.for_config(self.config)
        state = self.embed(input_ids, attention_mask, token_type_ids, labels, exitable)
        for layer_number in range(1, self.num_layers + 1):
            state = self.run_layer(layer_number, state, decision)
        return state


def run_exit_layer(
    layer: nn.Module,
    head: nn.Module | None,
    layer_number: int,
    config: ElectraExitConfig,
    state: ExitState,
    decision: ExitDecision,
) -> ExitState:
    """One discriminator layer and its head on the active tokens of `state`.

    A free function so that a pipeline stage holding only some layers can run them.
    """
    if decision.capacity is not None and (state.prefix is not None or layer_number in decision.capacity.exit_layers):
        return run_capacity_layer(layer, head, layer_number, config, state, decision)
    return run_threshold_layer(layer, head, layer_number, config, state, decision)
