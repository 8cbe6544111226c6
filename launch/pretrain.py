"""Pre-train ELECTRA with token-level early exit on DeepSpeed.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json            # 1 process per GPU (or 1 on CPU)
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    torchrun --nproc_per_node 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    mpirun -np 2 python launch/pretrain.py --deepspeed ds_configs/zero2.json

With no other argument it trains the `smoke` preset on the embedded corpus and leaves
checkpoints and a Hugging Face export in runs/electra. `--help` lists every flag.

Exit codes: 0 finished, or preempted after saving a checkpoint (SIGTERM, SIGINT, or the
launcher gone); 2 a user error, one line on stderr, raised before any work starts (nothing
is written); 3 a lost peer (resume with --resume auto).

Thin wrapper for a source checkout: the program is dsexit/commands/pretrain.py
(installed as `dsexit-pretrain`, `python -m dsexit.train`).
"""

import sys

from dsexit.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
