"""Pre-train ELECTRA with token-level early exit on DeepSpeed.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json            # 1 process per GPU (or 1 on CPU)
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    torchrun --nproc_per_node 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    mpirun -np 2 python launch/pretrain.py --deepspeed ds_configs/zero2.json

With no other argument it trains the `smoke` preset on the embedded corpus and leaves
checkpoints and a Hugging Face export in runs/electra. `--help` lists every flag.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_PEER_LOST = 3  # a collective lost a peer (node loss); resume with --resume auto


def main(argv: list[str] | None = None) -> int:
    from dsexit.train.distributed import (configure_threads, describe_peer_failure, destroy_process_group,
                                          discover_world, init_process_group, select_accelerator)

    select_accelerator()  # before DeepSpeed is imported anywhere
    from dsexit.train.cli import parse_config
    from dsexit.train.config import ConfigError
    from dsexit.train.metrics import setup_logging
    from dsexit.train.resolve import resolve_run

    world = None
    try:
        config, args = parse_config(argv)
        world = discover_world()
        threads = configure_threads(world)
        run = resolve_run(config, world, threads)  # every user error surfaces here, before any process group
    except (ConfigError, OSError) as error:
        if world is None or world.is_main:
            print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        if world.is_main:
            print(run.to_json())
        return 0
    setup_logging(world, run.run_dir)
    log = logging.getLogger("dsexit")
    log.info("resolved config:\n%s", run.to_json())
    init_process_group(world, config.parallelism.dist_timeout_s)
    from dsexit.train.trainer import Trainer

    try:
        reason = Trainer(run).train()
    except RuntimeError as error:  # torch.distributed.DistBackendError is one
        lost = describe_peer_failure(error, world)
        if lost is None:
            raise
        log.error("%s", lost)
        for handler in log.handlers:
            handler.flush()
        # The process group is broken: a normal exit could block in its teardown (or in the
        # data prefetch threads), and a bounded exit is the point of reporting this.
        os._exit(EXIT_PEER_LOST)
    log.info("done (%s); run directory: %s", reason, run.run_dir)
    destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
