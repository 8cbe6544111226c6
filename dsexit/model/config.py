"""The model's configuration: one dataclass, named presets, validation.

`ElectraExitConfig` describes the generator, the discriminator and the early-exit rule.
Field names follow `transformers.ElectraConfig` where a field exists there, so that a
Hugging Face config can be derived from it (see `dsexit.model.hf`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .exit_rules import EXIT_RULES

GENERATOR_MODES = ("mlm", "uniform", "unigram")
HEAD_BIAS_INITS = ("prior", "zero")
EXIT_KV_MODES = ("keep", "drop")
EXIT_HEADS = ("dense", "linear")
EXIT_ROUTINGS = ("threshold", "capacity", "random")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
EXIT_CRITERIA = tuple(EXIT_RULES)
CHOICES = {
    "hidden_act": ACTIVATIONS,
    "head_bias_init": HEAD_BIAS_INITS,
    "generator": GENERATOR_MODES,
    "exit_criterion": EXIT_CRITERIA,
    "exit_kv": EXIT_KV_MODES,
    "exit_head": EXIT_HEADS,
    "exit_routing": EXIT_ROUTINGS,
}
"""Fields that take one of a few names (validated here; the command line offers them as choices)."""
DATASET_FIELDS = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
"""Fields a pre-training run takes from its dataset's index, never from the user."""
TRAINING_FIELDS = {
    "target_compute": "exit_control.target_compute",
    "controller_gain": "exit_control.controller_gain",
    "exit_warmup_steps": "exit_control.warmup_steps",
}
"""Fields that older runs stored in the model config and that now belong to the training config
(`dsexit.train.config.train_config.ExitControlConfig`): `from_saved` drops them, `from_dict` names their new place."""
RETIRED_FIELDS = ("extra", *TRAINING_FIELDS)


@dataclass
class ElectraExitConfig:
    """ELECTRA (generator + discriminator) with token-level early exit in the discriminator.

    Layers are numbered from 1. Discriminator layers `min_exit_layer .. num_hidden_layers-1`
    carry an exit head; layer `num_hidden_layers` uses the ordinary discriminator head.
    """

    # --- vocabulary and special tokens (normally taken from the dataset's index) ---
    vocab_size: int = 30522
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    # --- discriminator ---
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    head_bias_init: str = "zero"
    """Output bias of the RTD heads at initialisation: "zero" = Hugging Face's, "prior" = the
    log-odds of the masking rate. The replacement rate is the first thing the heads learn; with
    a zero bias and Adam's bounded steps, a small discriminator learns it through its hidden
    states instead, and its top layers end up giving every token one constant state. The quick
    benchmark uses "prior"."""

    # --- generator (shares the embeddings; hidden defaults to hidden_size / 4) ---
    generator: str = "mlm"
    """Where replacements come from: "mlm", a small MLM generator trained alongside, or generator-free
    draws, "uniform" over the vocabulary or "unigram" by corpus frequency (at CPU budgets only
    generator-free discriminators leave the replaced-token prior)."""
    generator_hidden_size: int | None = None
    generator_num_hidden_layers: int | None = None
    generator_num_attention_heads: int | None = None
    generator_intermediate_size: int | None = None

    # --- pre-training objective ---
    mask_prob: float = 0.15
    """Share of real, non-special tokens masked for the generator and replaced for the discriminator."""
    disc_weight: float = 50.0
    """Weight of the discriminator (RTD) term against the generator's MLM loss."""
    generator_temperature: float = 1.0
    """Replacements are drawn from softmax(generator logits / T); T > 1 flattens them (harder
    to tell from the context alone while the generator is still at the unigram plateau)."""
    replacement_mix: float = 0.0
    """Share of masked positions whose replacement is drawn from the fixed `replacement_probs`
    (uniform over the vocabulary, specials excluded) instead of the generator, at step 0."""
    replacement_mix_steps: int = 0
    """Steps over which `replacement_mix` falls linearly to 0 (0: it stays constant)."""

    # --- early exit ---
    exit_enabled: bool = True
    """Token-level early exit: exit heads on the discriminator's layers, tokens leave when confident."""
    min_exit_layer: int | None = None
    """First layer (1-based) with an exit head; default: a third of the depth."""
    exit_threshold: float = 0.9
    """Confidence at or above which a token exits (tau); the controller's start value (the
    controller's own settings are training settings: `dsexit.train.config.train_config.ExitControlConfig`)."""
    exit_criterion: str = "prior_margin"
    """The exit rule, by name (`dsexit/model/exit_rules/`, one file per rule):
    "prior_margin": |tanh((x - prior_logit) / 2)| >= tau, the distance of the head's log-odds
        from the replacement prior's (logit of mask_prob). A head that predicts the base rate
        for every token (what an untrained or collapsed head does) has confidence 0 and lets
        nothing exit, however low tau goes.
    "confidence": |2p - 1| = |tanh(x / 2)| >= tau, the distance from p = 0.5. A head at the
        ~15% prior already reaches 0.70 on every token."""
    exit_special_tokens: bool = False
    """Let [CLS] and [SEP] exit on their own confidence. By default they are pinned: their RTD label
    is always 0, so heads grow confident on them at once, and [CLS] is the state fine-tuning reads;
    pinned, they run as long as any other token of their sequence does and leave with its last
    exitable token (so a fully exited sequence has no active token left). Pinned tokens are not
    counted in the compute fraction (neither executed nor full), which measures only exitable tokens."""
    exit_kv: str = "keep"
    """Exited tokens stay visible as keys and values ("keep") or leave the sequence ("drop")."""
    exit_routing: str = "threshold"
    """How many tokens leave at each exit head. "threshold": every token whose confidence reaches tau
    (the controller steers tau); each layer then has its own, data-dependent number of rows.
    "capacity": a fixed number of rows per sequence continue after each head, the least confident
    under the exit rule, and the rest leave; the capacities come from a schedule the controller steers
    (`capacity.py`), rounded to sixteenths of the sequence, so shapes are static and the step compiles.
    "random": the same capacities, the continuing rows drawn at random (DeepSpeed random-LTD's rule), a
    control for whether the heads' confidence beats chance. Pipeline runs take threshold routing only."""
    exit_head: str = "dense"
    """Shape of the exit heads: "dense" = the discriminator head's (dense H->H, activation, dense
    H->1, as HF's ElectraDiscriminatorPredictions), "linear" = one dense H->1. A dense head on every
    active token of every exit layer costs about a twelfth of a layer's FLOPs at electra-small's
    widths; a linear head about nothing."""
    exit_interval: int = 1
    """An exit head after every `exit_interval`-th layer from `min_exit_layer` (1: every layer)."""
    exit_supervision: float = 1.0
    """Share of the tokens reaching an exit head that train it (deep supervision), drawn afresh each
    step; exiting tokens always do (the head gives their RTD logit). Below 1, the heads' forward on
    the other tokens runs without autograd, so their backward is skipped."""
    aux_weight: float = 0.5
    """Share a of the discriminator term taken by the exit heads (deep supervision):
    disc_weight x ((1 - a) x final RTD + a x mean exit-head RTD). The two shares add up to 1,
    so the generator's share of the loss is the same with and without exits."""

    def __post_init__(self) -> None:
        if self.generator_hidden_size is None:
            self.generator_hidden_size = max(1, self.hidden_size // 4)
        if self.generator_num_hidden_layers is None:
            self.generator_num_hidden_layers = self.num_hidden_layers
        if self.generator_num_attention_heads is None:
            # google-research/electra: one head per 64 hidden units.
            self.generator_num_attention_heads = max(1, self.generator_hidden_size // 64)
        if self.generator_intermediate_size is None:
            self.generator_intermediate_size = 4 * self.generator_hidden_size
        if self.min_exit_layer is None:
            self.min_exit_layer = max(1, self.num_hidden_layers // 3)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, value: Any, expected: str) -> None:
            raise ValueError(f"model config: {name}={value!r} is invalid; expected {expected}.")

        for name in (
            "vocab_size",
            "embedding_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "generator_hidden_size",
            "generator_num_hidden_layers",
            "generator_num_attention_heads",
            "generator_intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", self.hidden_size, f"a multiple of num_attention_heads={self.num_attention_heads}")
        if self.generator_hidden_size % self.generator_num_attention_heads:
            fail(
                "generator_hidden_size",
                self.generator_hidden_size,
                f"a multiple of generator_num_attention_heads={self.generator_num_attention_heads}",
            )
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                fail(name, value, f"a token id in [0, vocab_size={self.vocab_size})")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                fail(name, getattr(self, name), f"one of {', '.join(choices)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, getattr(self, name), "a probability in [0, 1)")
        if not 0.0 < self.mask_prob < 1.0:
            fail("mask_prob", self.mask_prob, "a fraction in (0, 1)")
        if not (math.isfinite(self.generator_temperature) and self.generator_temperature > 0):
            fail("generator_temperature", self.generator_temperature, "a positive sampling temperature")
        if not 0.0 <= self.replacement_mix <= 1.0:
            fail("replacement_mix", self.replacement_mix, "a share of masked positions in [0, 1]")
        if self.replacement_mix_steps < 0:
            fail("replacement_mix_steps", self.replacement_mix_steps, "a non-negative number of steps")
        if not (math.isfinite(self.exit_threshold) and 0.0 < self.exit_threshold <= 1.0):
            fail("exit_threshold", self.exit_threshold, "a confidence tau in (0, 1]")
        if not isinstance(self.min_exit_layer, int) or not 1 <= self.min_exit_layer < self.num_hidden_layers:
            fail(
                "min_exit_layer",
                self.min_exit_layer,
                f"a layer number in [1, {self.num_hidden_layers - 1}] "
                f"(the model has num_hidden_layers={self.num_hidden_layers})",
            )
        if not isinstance(self.exit_interval, int) or self.exit_interval < 1:
            fail("exit_interval", self.exit_interval, "a whole number of layers >= 1")
        if not 0.0 < self.exit_supervision <= 1.0:
            fail("exit_supervision", self.exit_supervision, "a share of tokens in (0, 1]")
        if not 0.0 <= self.aux_weight < 1.0:
            fail("aux_weight", self.aux_weight, "the exit heads' share of the discriminator loss, in [0, 1)")
        if self.disc_weight < 0:
            fail("disc_weight", self.disc_weight, "a non-negative weight")

    # ------------------------------------------------------------------ derived
    @property
    def exit_layers(self) -> list[int]:
        """Layer numbers (1-based) that carry an exit head, the final layer excluded."""
        if not self.exit_enabled:
            return []
        return list(range(self.min_exit_layer, self.num_hidden_layers, self.exit_interval))

    def replacement_mix_at(self, step: int) -> float:
        """Share of masked positions replaced from the fixed distribution at optimizer step `step`."""
        if self.replacement_mix_steps == 0:
            return self.replacement_mix
        return self.replacement_mix * max(0.0, 1.0 - step / self.replacement_mix_steps)

    def masked_slots(self, seq_len: int) -> int:
        """Masked positions per sequence of `seq_len` at most (google-research/electra's
        `max_predictions_per_seq`, int((mask_prob + 0.005) x seq_len): 19 at 128): the generator's
        fixed [batch, slots] layout."""
        return max(1, min(seq_len, int((self.mask_prob + 0.005) * seq_len)))

    @property
    def prior_logit(self) -> float:
        """Log-odds of the replacement prior (the masking rate): where `prior_margin` is zero."""
        return math.log(self.mask_prob / (1.0 - self.mask_prob))

    @property
    def pinned_token_ids(self) -> tuple[int, ...]:
        """Tokens that leave only with their sequence's last exitable token (none when `exit_special_tokens`)."""
        return () if self.exit_special_tokens else (self.cls_token_id, self.sep_token_id)

    @property
    def uses_generator_network(self) -> bool:
        return self.generator == "mlm"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ElectraExitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(set(values) & set(TRAINING_FIELDS))
        if moved:
            raise ValueError(
                f"model config: {', '.join(moved)} are training settings now; set "
                f"{', '.join(TRAINING_FIELDS[name] for name in moved)} in the training config."
            )
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"model config: unknown field(s) {', '.join(unknown)}; expected fields of ElectraExitConfig."
            )
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "ElectraExitConfig":
        """A model config a checkpoint stored, also one written before `RETIRED_FIELDS` left it."""
        return cls.from_dict({name: value for name, value in values.items() if name not in RETIRED_FIELDS})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ElectraExitConfig":
        if name not in PRESETS:
            raise ValueError(f"model preset {name!r} is unknown; expected one of {', '.join(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and smoke runs.
    "electra-tiny": dict(
        embedding_size=32,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        generator_hidden_size=32,
        generator_num_hidden_layers=2,
        max_position_embeddings=128,
        min_exit_layer=1,
    ),
    # Clark et al. 2020, ELECTRA-Small (generator at hidden/4, as in the paper's best setting).
    "electra-small": dict(
        embedding_size=128,
        hidden_size=256,
        num_hidden_layers=12,
        num_attention_heads=4,
        intermediate_size=1024,
        generator_hidden_size=64,
        min_exit_layer=4,
    ),
    # ELECTRA-Base: generator hidden 256 (1/3 of 768), as released by google-research/electra.
    "electra-base": dict(
        embedding_size=768,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        generator_hidden_size=256,
        min_exit_layer=4,
    ),
}
