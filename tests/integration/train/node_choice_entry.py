"""One rank of a two-node resume choice: each rank is a node of its own with its own checkpoint
directory (argv: rank, port, mirror URL, checkpoint directory). Prints the checkpoint it would load."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch.distributed as dist

from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.errors import CheckpointError

rank, port, url, staging = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
manager = CheckpointManager(url, staging, keep_last=3, world=WorldInfo(rank, 2, 0, 1, "env"))
try:
    ref = manager.find_resume("auto")
    print(json.dumps({"tag": ref.tag, "root": ref.root}), flush=True)
except CheckpointError as error:
    print(json.dumps({"error": str(error)}), flush=True)
dist.destroy_process_group()
