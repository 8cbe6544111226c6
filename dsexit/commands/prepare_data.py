"""Command line for data preparation: raw text -> tokenizer -> packed shards + index.json.

Example:
    python launch/prepare_data.py --input 'corpus/*.jsonl.gz' --out s3://bucket/electra-128 \
        --tokenizer train:30522 --seq-len 128 --validation-fraction 0.02
See dsexit/data/prepare.py for the pipeline and dsexit/data/index.py for the format.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsexit.data.prepare import prepare_dataset
from dsexit.data.sources import UNDECODABLE_CHOICES
from dsexit.storage import redact_text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="paths, globs, fsspec URLs, or hf:DIR / hf:NAME[@SPLIT]"
    )
    parser.add_argument("--out", required=True, help="dataset URL: local path, file://, s3://, gs://, memory://")
    parser.add_argument("--tokenizer", default="train:30522", help="train:VOCAB_SIZE | spm:MODEL | wordpiece:VOCAB")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-mb", type=float, default=64)
    parser.add_argument("--text-field", default="text", help="JSON Lines / datasets column holding the text")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the packer's random segment choices and of the validation split"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.02,
        help="share of documents held out, whole, into validation shards, in [0, 0.5); 0 disables",
    )
    parser.add_argument(
        "--encoding", default="utf-8", help="encoding of text inputs (any Python codec: utf-8, latin-1, cp1252, ...)"
    )
    parser.add_argument(
        "--undecodable",
        choices=UNDECODABLE_CHOICES,
        default="error",
        help="bytes that do not decode: error (default) or skip their lines, counted at the end",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dsexit dataset at --out (only the files its index.json lists); "
        "a location holding anything else is refused either way",
    )
    parser.add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prepare_dataset(
            args.input,
            args.out,
            args.tokenizer,
            seq_len=args.seq_len,
            shard_mb=args.shard_mb,
            overwrite=args.overwrite,
            text_field=args.text_field,
            seed=args.seed,
            storage_options=args.storage_options,
            validation_fraction=args.validation_fraction,
            encoding=args.encoding,
            undecodable=args.undecodable,
        )
    except (ValueError, OSError) as error:  # OSError: a location unreadable through every retry, too
        message = " ".join(str(error).split())  # one line, whatever the message holds
        message = redact_text(message, args.out, *args.input)  # credentials in a URL never reach the terminal
        print(f"prepare_data: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
