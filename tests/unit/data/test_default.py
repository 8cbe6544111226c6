"""The dataset embedded in the package: small, complete, ELECTRA's vocabulary, readable offline."""

import os

from dsexit.data import DEFAULT_DATA_URL, DatasetIndex, StreamingShardReader, save_hf_tokenizer
from tests.helpers.datasets import shared_file


def test_default_dataset_is_small_complete_and_ships_no_raw_text():
    files = sorted(os.listdir(DEFAULT_DATA_URL))
    index = DatasetIndex.load(DEFAULT_DATA_URL)
    shards = index.shards + index.validation_shards
    assert files == sorted(["index.json", "vocab.txt"] + [shard.name for shard in shards])
    assert sum(os.path.getsize(os.path.join(DEFAULT_DATA_URL, name)) for name in files) <= 5_000_000
    assert (index.seq_len, index.vocab_size, index.tokenizer["kind"]) == (128, 30522, "wordpiece")
    assert index.num_samples > 10_000
    # A held-out split of about 2% (documents are held out, so samples only roughly follow).
    assert 0.01 < index.num_validation_samples / (index.num_samples + index.num_validation_samples) < 0.04


def test_default_dataset_uses_electras_vocabulary_and_decodes_to_english(tmp_path):
    vocab = shared_file("tokenizer/bert-base-uncased-vocab.txt")
    assert open(os.path.join(DEFAULT_DATA_URL, "vocab.txt"), "rb").read() == vocab.read_bytes()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_hf_tokenizer(DEFAULT_DATA_URL, str(tmp_path / "hf")))
    with StreamingShardReader(DEFAULT_DATA_URL, global_batch_size=64, micro_batch_size=64) as reader:
        batch = next(reader)  # every shard is sha256-checked on the way in
    text = " ".join(tokenizer.decode(row, skip_special_tokens=True) for row in batch["input_ids"])
    common = sum(text.split().count(word) for word in ("the", "and", "of", "to"))
    assert common > 200, text[:500]
