"""Conversion to Hugging Face `transformers` ELECTRA models.

The rename is a prefix at most:

| dsexit parameter                         | Hugging Face                                   |
|------------------------------------------|------------------------------------------------|
| `discriminator.<name>`                   | `ElectraForPreTraining`: `<name>`              |
| `discriminator.exit_heads.*`             | (not exported: HF has no exit heads)           |
| `generator.<name>`                       | `ElectraForMaskedLM`: `<name>`                 |
| `discriminator.electra.embeddings.<name>`| `ElectraForMaskedLM`: `electra.embeddings.<name>` (shared) |
| (tied) word embeddings                   | `ElectraForMaskedLM`: `generator_lm_head.weight` |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from .config import ElectraExitConfig

if TYPE_CHECKING:  # transformers is imported only when a conversion runs
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

DISCRIMINATOR_PREFIX = "discriminator."
GENERATOR_PREFIX = "generator."
EMBEDDINGS_PREFIX = "discriminator.electra.embeddings."


def hf_config(config: ElectraExitConfig, part: str = "discriminator"):
    """`transformers.ElectraConfig` for the discriminator or the generator."""
    from transformers import ElectraConfig

    common = dict(
        vocab_size=config.vocab_size,
        embedding_size=config.embedding_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
    )
    if part == "discriminator":
        sizes = dict(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
        )
    elif part == "generator":
        sizes = dict(
            hidden_size=config.generator_hidden_size,
            num_hidden_layers=config.generator_num_hidden_layers,
            num_attention_heads=config.generator_num_attention_heads,
            intermediate_size=config.generator_intermediate_size,
        )
    else:
        raise ValueError(f"part={part!r} is unknown; expected 'discriminator' or 'generator'.")
    return ElectraConfig(**common, **sizes)


def discriminator_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ElectraForPreTraining` weights from a dsexit state dict (exit heads dropped)."""
    return {
        name[len(DISCRIMINATOR_PREFIX) :]: tensor
        for name, tensor in state.items()
        if name.startswith(DISCRIMINATOR_PREFIX) and ".exit_heads." not in f".{name}"
    }


def generator_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ElectraForMaskedLM` weights from a dsexit state dict (embeddings and LM head tied)."""
    converted = {
        name[len(GENERATOR_PREFIX) :]: tensor for name, tensor in state.items() if name.startswith(GENERATOR_PREFIX)
    }
    if not converted:
        raise ValueError("the state dict has no generator weights (generator mode is not 'mlm').")
    for name, tensor in state.items():
        if name.startswith(EMBEDDINGS_PREFIX):
            converted["electra.embeddings." + name[len(EMBEDDINGS_PREFIX) :]] = tensor
    converted["generator_lm_head.weight"] = converted["electra.embeddings.word_embeddings.weight"]
    return converted


def _load(model, weights: dict[str, torch.Tensor]):
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # HF keeps non-persistent buffers (position_ids, token_type_ids) out of state dicts.
    missing = [name for name in missing if not name.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    return model.eval()


def to_hf_pretraining(model) -> ElectraForPreTraining:
    """The discriminator as `ElectraForPreTraining` with the same weights (exits off)."""
    from transformers import ElectraForPreTraining

    weights = {
        name: tensor.detach().clone().float() for name, tensor in discriminator_state_dict(model.state_dict()).items()
    }
    return _load(ElectraForPreTraining(hf_config(model.config, "discriminator")), weights)


def to_hf_masked_lm(model) -> ElectraForMaskedLM:
    """The generator as `ElectraForMaskedLM` with the same weights."""
    from transformers import ElectraForMaskedLM

    weights = {
        name: tensor.detach().clone().float() for name, tensor in generator_state_dict(model.state_dict()).items()
    }
    return _load(ElectraForMaskedLM(hf_config(model.config, "generator")), weights)
