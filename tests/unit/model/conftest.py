"""Shared fixtures for the model tests: small configs and deterministic batches."""

import pytest
import torch

from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel

VOCAB = 1000


def make_batch(batch_size: int = 4, seq_len: int = 32, pad_tail: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(200, VOCAB, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 101
    input_ids[:, -1] = 102
    attention_mask = torch.ones_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 :] = 1
    if pad_tail:
        for row, length in enumerate(range(seq_len, 0, -max(1, seq_len // (batch_size + 1)))):
            if row >= batch_size:
                break
            input_ids[row, length:] = 0
            attention_mask[row, length:] = 0
            token_type_ids[row, length:] = 0
    return input_ids, attention_mask, token_type_ids


@pytest.fixture
def tiny_config():
    return ElectraExitConfig.from_preset("electra-tiny", vocab_size=VOCAB)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return ElectraPreTrainingModel(tiny_config)
