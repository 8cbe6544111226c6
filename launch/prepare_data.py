"""Command line for data preparation: raw text -> tokenizer -> packed shards + index.json.

Example:
    python launch/prepare_data.py --input 'corpus/*.jsonl.gz' --out s3://bucket/electra-128 \
        --tokenizer train:30522 --seq-len 128 --validation-fraction 0.02
See dsexit/data/prepare.py for the pipeline and dsexit/data/index.py for the format.

Thin wrapper for a source checkout: the program is dsexit/commands/prepare_data.py
(installed as `dsexit-prepare`).
"""

import sys

from dsexit.commands.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
