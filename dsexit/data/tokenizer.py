"""Tokenizers for data preparation and their Hugging Face export.

This module owns the `--tokenizer` spec (`train:VOCAB_SIZE`, `spm:MODEL`,
`wordpiece:VOCAB`), SentencePiece training, the special-token ids a dataset
records, fast batch encoding for `prepare_data`, and `save_hf_tokenizer`, which
writes a directory `transformers.AutoTokenizer.from_pretrained` loads offline.

SentencePiece models are trained with [PAD]=0, [UNK]=1 and the control symbols
[CLS]=2, [SEP]=3, [MASK]=4, so the special tokens read like BERT's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable

from dsexit.storage import open_url_fs

WORDPIECE_FILE = "vocab.txt"
SENTENCEPIECE_FILE = "tokenizer.model"
_SPM_SPECIAL_PIECES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}


def parse_tokenizer_spec(spec: str) -> tuple[str, str]:
    """("train", vocab size) | ("spm", model path) | ("wordpiece", vocab path)."""
    kind, _, value = spec.partition(":")
    if kind not in ("train", "spm", "wordpiece") or not value:
        raise ValueError(f"Unknown tokenizer spec {spec!r}; expected train:VOCAB_SIZE, spm:MODEL or wordpiece:VOCAB.")
    if kind == "train" and (not value.isdigit() or not 100 <= int(value) <= 1 << 20):
        raise ValueError(f"Tokenizer spec {spec!r} needs a vocabulary size between 100 and 1048576.")
    return kind, value


def vocab_is_lowercase(vocab_path: str) -> bool:
    """An uncased WordPiece vocab (like bert-base-uncased) has no capital letters outside [SPECIAL] tokens."""
    with open(vocab_path, encoding="utf-8") as handle:
        return not any(line[0] != "[" and line != line.lower() for line in handle if line.strip())


@dataclass
class TextTokenizer:
    """A tokenizer ready to encode text for packing, and what index.json records about it."""

    kind: str  # "wordpiece" | "sentencepiece"
    local_path: str  # the vocab.txt / tokenizer.model file
    vocab_size: int
    special_tokens: dict[str, int]
    _encoder: object = None

    @property
    def file_name(self) -> str:
        return WORDPIECE_FILE if self.kind == "wordpiece" else SENTENCEPIECE_FILE

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._encoder.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)
        return [encoding.ids for encoding in self._encoder.encode_batch(texts, add_special_tokens=False)]

    @classmethod
    def wordpiece(cls, vocab_path: str) -> "TextTokenizer":
        from transformers import ElectraTokenizerFast

        # Positional: the argument is vocab_file in transformers 4.x and vocab in 5.x.
        hf_tokenizer = ElectraTokenizerFast(vocab_path, do_lower_case=vocab_is_lowercase(vocab_path))
        vocab = hf_tokenizer.get_vocab()
        names = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
        missing = [piece for piece in names.values() if piece not in vocab]
        if missing:
            raise ValueError(f"WordPiece vocab {vocab_path} lacks the special tokens {missing}.")
        special = {name: vocab[piece] for name, piece in names.items()}
        return cls("wordpiece", vocab_path, len(vocab), special, hf_tokenizer.backend_tokenizer)

    @classmethod
    def sentencepiece(cls, model_path: str) -> "TextTokenizer":
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:  # sentencepiece raises RuntimeError for a non-model file
            raise ValueError(
                f"SentencePiece model {model_path} could not be read ({error}); expected a tokenizer.model file "
                "written by SentencePiece training."
            ) from None
        pieces = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        special = {}
        for name, candidates in _SPM_SPECIAL_PIECES.items():
            found = [pieces[piece] for piece in candidates if piece in pieces]
            if not found:
                raise ValueError(
                    f"SentencePiece model {model_path} has no {name} piece (looked for {candidates}); "
                    "train it with control_symbols=[CLS],[SEP],[MASK] and pad_id>=0."
                )
            special[name] = found[0]
        return cls("sentencepiece", model_path, processor.get_piece_size(), special, processor)


def train_sentencepiece(
    sentences: Iterable[str], vocab_size: int, model_path: str, max_sentences: int = 3_000_000
) -> str:
    """Train a unigram SentencePiece model on (a sample of) the sentences; returns model_path."""
    import sentencepiece

    prefix = model_path[: -len(".model")] if model_path.endswith(".model") else model_path
    input_errors: list[Exception] = []

    def guarded_sentences():
        # SentencePiece swallows exceptions from the iterator into its own error; keep ours.
        try:
            yield from sentences
        except Exception as error:
            input_errors.append(error)

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=guarded_sentences(),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=0.9999,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if input_errors:
            raise input_errors[0] from None
        raise ValueError(f"SentencePiece training with vocab size {vocab_size} failed: {error}") from None
    if input_errors:
        raise input_errors[0]
    if prefix + ".model" != model_path:
        os.replace(prefix + ".model", model_path)
    return model_path


def load_tokenizer(spec: str, sentences_for_training=None, work_dir: str | None = None) -> TextTokenizer:
    """Build the tokenizer a spec names; `train:` needs a callable returning an iterable of sentences."""
    kind, value = parse_tokenizer_spec(spec)
    if kind == "train":
        path = os.path.join(work_dir or tempfile.mkdtemp(prefix="dsexit-spm-"), SENTENCEPIECE_FILE)
        return TextTokenizer.sentencepiece(train_sentencepiece(sentences_for_training(), int(value), path))
    if not os.path.isfile(value):
        raise FileNotFoundError(f"Tokenizer file {value!r} (from spec {spec!r}) does not exist.")
    if kind == "spm":
        return TextTokenizer.sentencepiece(value)
    try:
        return TextTokenizer.wordpiece(value)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"WordPiece vocab {value} is not UTF-8 text ({error.reason} at byte {error.start}); expected one "
            "token per line."
        ) from None


# ---- Hugging Face export ----------------------------------------------------------


def _sentencepiece_backend(model_path: str, special_tokens: dict[str, int]):
    """A `tokenizers.Tokenizer` that reproduces the SentencePiece unigram model, with BERT-style pairs."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as handle:
        proto.ParseFromString(handle.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(
            f"SentencePiece model {model_path} is not a unigram model; only unigram exports to Hugging Face here."
        )
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = Tokenizer(Unigram(pieces, proto.trainer_spec.unk_id, proto.trainer_spec.byte_fallback))
    # SentencePiece's own normalization: its compiled NFKC map, collapsed and stripped whitespace.
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Strip(),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    cls_piece, sep_piece = pieces[special_tokens["cls"]][0], pieces[special_tokens["sep"]][0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_piece} $A {sep_piece}",
        pair=f"{cls_piece} $A {sep_piece} $B:1 {sep_piece}:1",
        special_tokens=[(cls_piece, special_tokens["cls"]), (sep_piece, special_tokens["sep"])],
    )
    return backend, {name: pieces[token_id][0] for name, token_id in special_tokens.items()}


def save_hf_tokenizer(index_or_url, out_dir: str, storage_options: dict | None = None) -> str:
    """Write a Hugging Face tokenizer directory for a dataset (a DatasetIndex or its URL); returns out_dir.

    WordPiece datasets get an `ElectraTokenizerFast`; SentencePiece datasets get a
    `PreTrainedTokenizerFast` (tokenizer.json) plus the original tokenizer.model.
    """
    from transformers import ElectraTokenizerFast, PreTrainedTokenizerFast

    from dsexit.data.index import DatasetIndex

    index = index_or_url if isinstance(index_or_url, DatasetIndex) else DatasetIndex.load(index_or_url, storage_options)
    os.makedirs(out_dir, exist_ok=True)
    local_file = os.path.join(out_dir, index.tokenizer["file"])
    fs, path = open_url_fs(index.tokenizer_url, storage_options)
    fs.get_file(path, local_file)
    if index.tokenizer["kind"] == "wordpiece":
        hf_tokenizer = ElectraTokenizerFast(local_file, do_lower_case=vocab_is_lowercase(local_file))
    else:
        backend, names = _sentencepiece_backend(local_file, index.special_tokens)
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            **{f"{name}_token": piece for name, piece in names.items()},
            model_max_length=index.seq_len,
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # ELECTRA takes segment ids
        )
    hf_tokenizer.model_max_length = index.seq_len
    hf_tokenizer.save_pretrained(out_dir)
    return out_dir


def copy_tokenizer_file(tokenizer: TextTokenizer, out_url: str, storage_options: dict | None = None) -> None:
    from dsexit.storage import join_url

    fs, path = open_url_fs(join_url(out_url, tokenizer.file_name), storage_options)
    with open(tokenizer.local_path, "rb") as source, fs.open(path, "wb") as target:
        shutil.copyfileobj(source, target)
