"""`python -m dsexit.train`: pre-training, the same program as `dsexit-pretrain` and launch/pretrain.py.

Under the launchers: `deepspeed --module dsexit.train ARGS`, `torchrun --nproc_per_node N -m dsexit.train ARGS`.
"""

import sys

from dsexit.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
