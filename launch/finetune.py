"""Fine-tune a pre-trained ELECTRA discriminator on a classification task, or probe it; median over seeds.

    python launch/finetune.py --model runs/electra/hf --task ../shared/data/downstream/rt_sentiment
    python launch/finetune.py --model runs/electra/checkpoints --task DIR --seeds 5 --select best-dev --out r.json
    python launch/finetune.py --model runs/electra/hf --task DIR --mode probe

The defaults are ELECTRA-Small's published fine-tuning recipe (lr 3e-4, layer-wise
learning-rate decay 0.8, warmup 10%, weight decay 0.01, 3 epochs, 10 for RTE/STS).
--mode probe fits a linear classifier on frozen final-layer [CLS] features instead.

--model is a Hugging Face export (launch/export_hf.py) or a dsexit checkpoint (a tag
directory or a checkpoints root; it is exported first with the trainer's export code).
--task holds train/dev/test .jsonl with `text` (or `text_a`/`text_b`) and an integer `label`.
Prints per-seed and median dev/test accuracy, F1 and MCC; --out writes them as JSON.
Runs as one process; under a multi-process launcher only rank 0 works.

Thin wrapper for a source checkout: the program is dsexit/commands/finetune.py
(installed as `dsexit-finetune`).
"""

import sys

from dsexit.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
