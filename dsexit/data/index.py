"""The dataset index: `index.json`, the one description of a prepared dataset.

This module owns the on-storage format (version, dtype, shard list with sample
counts and sha256) and its validation. Everything else (writer, reader, trainer)
goes through `DatasetIndex` so the format is defined in one place.

Layout of a dataset at URL:
    URL/index.json           this index
    URL/shard-00000.bin      raw little-endian rows of `dtype`, shape [num_samples, seq_len]
    URL/validation-00000.bin held-out rows in the same layout (optional; never trained on)
    URL/<tokenizer file>     vocab.txt (WordPiece) or tokenizer.model (SentencePiece)

The held-out split sits under its own key, `"validation": {"shards": [...]}`, so
`shards`, `num_samples` and `fingerprint` describe the training data alone and an
index written before the split existed (no key) loads with no validation shards.

Token type ids are not stored: they are derived from the ids (0 up to and
including the first [SEP], 1 after it up to the last real token, 0 on padding),
which is exactly the segment layout the packer writes.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from dsexit.storage import ACCESS_ERRORS, access_error, join_url, open_url_fs, read_bytes

FORMAT_NAME = "dsexit-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SPECIAL_TOKEN_NAMES = ("pad", "unk", "cls", "sep", "mask")
TOKENIZER_KINDS = ("wordpiece", "sentencepiece")


class DatasetFormatError(ValueError):
    """index.json (or a shard) does not describe a dataset this reader can use."""


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 halves storage and bandwidth whenever every id fits in it."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def shard_name(shard_number: int) -> str:
    return f"shard-{shard_number:05d}.bin"


def validation_shard_name(shard_number: int) -> str:
    return f"validation-{shard_number:05d}.bin"


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    num_tokens: int = 0  # non-padding tokens, for reporting


@dataclass
class DatasetIndex:
    seq_len: int
    dtype: str
    vocab_size: int
    special_tokens: dict[str, int]
    tokenizer: dict[str, str]  # {"kind": wordpiece|sentencepiece, "file": name next to the shards}
    shards: list[ShardInfo] = field(default_factory=list)  # training data only
    validation_shards: list[ShardInfo] = field(default_factory=list)  # the held-out split; empty if none
    url: str = ""  # where it was loaded from; not serialized
    format_version: int = FORMAT_VERSION

    # ---- derived -------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(shard.num_tokens for shard in self.shards)

    @property
    def num_validation_samples(self) -> int:
        return sum(shard.num_samples for shard in self.validation_shards)

    @property
    def row_bytes(self) -> int:
        return self.seq_len * np.dtype(self.dtype).itemsize

    @property
    def fingerprint(self) -> str:
        """Identifies the content, so a resume can tell it is reading the same data."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(shard.sha256.encode())
        return digest.hexdigest()[:16]

    def shard_url(self, shard: ShardInfo) -> str:
        return join_url(self.url, shard.name)

    @property
    def tokenizer_url(self) -> str:
        return join_url(self.url, self.tokenizer["file"])

    def shard_starts(self) -> list[int]:
        """Global sample number of each shard's first row."""
        starts, total = [], 0
        for shard in self.shards:
            starts.append(total)
            total += shard.num_samples
        return starts

    def locate(self, sample: int, starts: list[int] | None = None) -> tuple[int, int]:
        """(shard number, row in shard) of a global sample number."""
        starts = starts if starts is not None else self.shard_starts()
        shard_number = bisect.bisect_right(starts, sample) - 1
        return shard_number, sample - starts[shard_number]

    # ---- (de)serialization ----------------------------------------------
    def to_json(self) -> str:
        body = asdict(self)
        body.pop("url")
        validation_shards = body.pop("validation_shards")
        body["format"] = FORMAT_NAME
        body["num_samples"] = self.num_samples
        body["num_tokens"] = self.num_tokens
        if validation_shards:  # absent rather than empty, so a dataset without a split reads as before
            body["validation"] = {
                "shards": validation_shards,
                "num_samples": self.num_validation_samples,
                "num_tokens": sum(shard.num_tokens for shard in self.validation_shards),
            }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, url: str = "") -> "DatasetIndex":
        where = join_url(url, INDEX_FILE) if url else INDEX_FILE
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{where} is not valid JSON ({error}).") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise DatasetFormatError(f'{where} is not a dsexit dataset index (expected "format": "{FORMAT_NAME}").')
        if body.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(
                f"{where} has format_version {body.get('format_version')!r}; this reader understands {FORMAT_VERSION}."
            )
        try:
            validation = body.get("validation", {})
            if not isinstance(validation, dict):
                raise TypeError(f'validation is {type(validation).__name__}, expected an object with "shards"')
            index = cls(
                seq_len=int(body["seq_len"]),
                dtype=str(body["dtype"]),
                vocab_size=int(body["vocab_size"]),
                special_tokens={name: int(body["special_tokens"][name]) for name in SPECIAL_TOKEN_NAMES},
                tokenizer={"kind": str(body["tokenizer"]["kind"]), "file": str(body["tokenizer"]["file"])},
                shards=[ShardInfo(**shard) for shard in body["shards"]],
                validation_shards=[ShardInfo(**shard) for shard in validation.get("shards", [])],
                url=url,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetFormatError(f"{where} is missing or has a malformed field ({error!r}).") from None
        index.validate(where)
        return index

    def validate(self, where: str = INDEX_FILE) -> None:
        if self.dtype not in ("uint16", "int32"):
            raise DatasetFormatError(f"{where} has dtype {self.dtype!r}; expected 'uint16' or 'int32'.")
        if self.dtype == "uint16" and self.vocab_size > 65536:
            raise DatasetFormatError(
                f"{where} stores vocab_size {self.vocab_size} as uint16, which cannot hold its ids."
            )
        if self.seq_len < 8:
            raise DatasetFormatError(f"{where} has seq_len {self.seq_len}; expected at least 8.")
        if self.tokenizer["kind"] not in TOKENIZER_KINDS:
            raise DatasetFormatError(
                f"{where} has tokenizer kind {self.tokenizer['kind']!r}; expected one of {TOKENIZER_KINDS}."
            )
        for name, token_id in self.special_tokens.items():
            if not 0 <= token_id < self.vocab_size:
                raise DatasetFormatError(
                    f"{where} has special token {name}={token_id} outside vocab_size {self.vocab_size}."
                )
        if not self.shards:
            raise DatasetFormatError(f"{where} lists no shards.")
        for shard in self.shards + self.validation_shards:
            if shard.num_bytes != shard.num_samples * self.row_bytes:
                raise DatasetFormatError(
                    f"{where}: shard {shard.name} has {shard.num_bytes} bytes, expected "
                    f"{shard.num_samples} samples x {self.row_bytes} bytes."
                )
        shared = {shard.name for shard in self.shards} & {shard.name for shard in self.validation_shards}
        if shared:
            raise DatasetFormatError(f"{where} lists {sorted(shared)} as both training and validation shards.")

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None, retries: int = 3) -> "DatasetIndex":
        """Read URL/index.json from any fsspec URL; raises FileNotFoundError naming it if absent,
        StorageAccessError if the URL cannot be opened here (protocol, package, credentials)."""
        url = url.rstrip("/")
        fs, path = open_url_fs(join_url(url, INDEX_FILE), storage_options)
        try:
            exists = fs.exists(path)
        except ACCESS_ERRORS as error:
            raise access_error(join_url(url, INDEX_FILE), error) from None
        if not exists:
            raise FileNotFoundError(f"No dataset at {url}: {join_url(url, INDEX_FILE)} does not exist.")
        text = read_bytes(fs, path, retries=retries, what=join_url(url, INDEX_FILE)).decode("utf-8", errors="replace")
        return cls.from_json(text, url=url)
