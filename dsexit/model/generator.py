"""The ELECTRA generator: a small masked language model over the shared embeddings.

Parameter names equal `transformers.ElectraForMaskedLM`'s except that the embeddings
live in the discriminator (`discriminator.electra.embeddings.*`) and the vocabulary
projection's weight is the word-embedding matrix (tied, as in HF), so only its bias is
stored here. The vocabulary projection runs only on the rows it is asked for: during
pre-training, the masked positions (15% of tokens) rather than every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ElectraExitConfig
from .discriminator import ElectraBody
from .flops import LayerWork
from .layers import ElectraEmbeddings, ElectraGeneratorPredictions, EncoderShape, TokenRouting


class TiedLMHead(nn.Module):
    """Vocabulary projection whose weight is the word-embedding matrix; owns only its bias."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, embedding_weight, self.bias)


class ElectraGenerator(nn.Module):
    def __init__(self, config: ElectraExitConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraBody(config, EncoderShape.generator(config), embeddings=None)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = TiedLMHead(config.vocab_size)

    def forward(
        self,
        embeddings: ElectraEmbeddings,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        work: list[LayerWork] | None = None,
    ) -> torch.Tensor:
        """Vocabulary logits [B*S, V] at `positions` (long [B, S]: S positions per sequence, the masked
        slots) or, if None, [B, T, V] at every position. `attention_mask` None: no padding.

        With `positions`, the last layer computes only those rows (their queries; keys and values stay
        every position's), since no other row of its output is read: a fixed [B, S] layout."""
        hidden = self.electra.project(embeddings(input_ids, token_type_ids))
        batch, seq_len = input_ids.shape
        every_position = TokenRouting.all_positions(attention_mask)
        full_rows = batch * seq_len
        real_tokens = full_rows if attention_mask is None else attention_mask.sum()
        layers = self.electra.encoder.layer
        for number, layer in enumerate(layers, start=1):
            if positions is not None and number == len(layers):
                selected = layer.at_positions(hidden, positions, attention_mask)
                layer_rows = positions.numel()
            else:
                hidden, _ = layer(hidden, every_position)
                layer_rows = full_rows
            if work is not None:
                work.append(
                    LayerWork(
                        token_layers=real_tokens,
                        rows=layer_rows,
                        key_value_rows=full_rows,
                        query_slots=layer_rows,
                        key_length=seq_len,
                    )
                )
        if positions is None:
            selected = hidden.reshape(full_rows, -1)
        logits = self.generator_lm_head(self.generator_predictions(selected), embeddings.word_embeddings.weight)
        return logits if positions is not None else logits.view(batch, seq_len, -1)
