"""Pre-train ELECTRA with token-level early exit on DeepSpeed.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json            # 1 process per GPU (or 1 on CPU)
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    torchrun --nproc_per_node 2 launch/pretrain.py --deepspeed ds_configs/zero2.json
    mpirun -np 2 python launch/pretrain.py --deepspeed ds_configs/zero2.json

With no other argument it trains the `smoke` preset on the embedded corpus and leaves
checkpoints and a Hugging Face export in runs/electra. `--help` lists every flag.

Exit codes: 0 finished, or preempted after saving a checkpoint (SIGTERM, SIGINT, or the
launcher gone; under an elastic agent with restarts left, the ranks of the nodes not preempted exit 3
after that save, so that the agent goes on without the preempted node); 1 no space left while saving
a checkpoint (one line naming the device); 2 a user error, one line on stderr: raised before any work
starts (nothing is written), or a checkpoint to resume that cannot be used, or a corrupt shard met
mid-run; 3 a lost peer: a failed collective, or a node's heartbeat silent for --heartbeat-timeout (an
elastic agent restarts the workers without it; otherwise resume with --resume auto). The trainer
raises typed errors (dsexit/train/errors.py); this module alone turns them into exit codes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

EXIT_NO_SPACE = 1  # the disk filled while a checkpoint was written
EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3  # a node was lost (a failed collective, a silent heartbeat); torchrun's agent restarts on it
EXIT_STATUS_ENV = "DSEXIT_EXIT_STATUS_FILE"  # where local rank 0 writes why the run stopped (docker/entrypoint.sh)


def _remove_if_only_empty_dirs(path: str) -> None:
    """Undo the directories a failed start created (the run directory, its empty checkpoints/): a
    user error leaves nothing behind. Anything holding a file stays."""
    for parent, _, files in os.walk(path, topdown=False):
        if files:
            return
        try:
            os.rmdir(parent)
        except OSError:
            return


def check_shards(run, local_rank: int) -> None:
    """Before any work: every shard is present with the size index.json lists; on local disk, the
    shards of the first step and of the held-out evaluation also hash to its sha256 (hashing
    remote shards here would download them twice; the reader checks every one it fetches)."""
    from dsexit.data.order import EpochOrder
    from dsexit.data.shards import check_shard_files
    from dsexit.storage import open_url_fs

    index, config = run.dataset, run.config
    fs, _ = open_url_fs(index.url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    to_hash: set[str] = set()
    if local_rank == 0 and "file" in protocols:
        order = EpochOrder(index, config.job.seed, 0, config.data.shuffle_window)
        starts = index.shard_starts()
        first_step = order.samples(0, config.training.global_batch_size)
        to_hash = {index.shards[index.locate(int(sample), starts)[0]].name for sample in first_step}
        wanted = config.metrics.eval_samples if config.metrics.eval_interval else 0
        for shard in index.validation_shards:
            if wanted <= 0:
                break
            to_hash.add(shard.name)
            wanted -= shard.num_samples
    check_shard_files(
        index.url,
        [(shard.name, shard.num_bytes, shard.sha256) for shard in index.shards + index.validation_shards],
        hash_names=to_hash,
    )


def report_stop(reason: str, local_rank: int) -> None:
    """Tell a supervising script (docker/entrypoint.sh) why the trainer stopped: after a signal, the
    launcher's own exit code does not say whether the checkpoint was saved."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path and local_rank == 0:
        with open(path, "w") as handle:
            handle.write(f"{reason}\n")


def _end(code: int, speak: str | None = None) -> None:
    """End a run that cannot go on, at once: prefetch threads, and other ranks that may wait in a
    collective, would block a normal exit (the launcher ends them). `speak`: one line on stderr."""
    if speak is not None:
        print(f"pretrain.py: error: {speak}", file=sys.stderr, flush=True)
    from dsexit.train.checkpoint.lease import release_leases

    release_leases()  # a restart need not wait for the lease to go stale
    for handler in logging.getLogger("dsexit").handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from dsexit.train.cluster.distributed import (
        describe_peer_failure,
        destroy_process_group,
        elastic_restarts_left,
        init_process_group,
        setup_process,
        start_process,
    )
    from dsexit.train.errors import CheckpointError, CheckpointSpaceError, ConfigError

    try:  # the accelerator before DeepSpeed is imported anywhere; tcmalloc's re-execution before torch is
        start_process(reexec=argv is None)
    except ConfigError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    from dsexit.data import DatasetFormatError, ShardCorruptError
    from dsexit.storage import StorageAccessError, redact_text
    from dsexit.train.config.cli import parse_config
    from dsexit.train.config.resolve import begin_run, hold_run_dir, resolve_run
    from dsexit.train.metrics import setup_logging

    world, run_dir, run_dir_existed = None, None, True
    try:
        config, args = parse_config(argv)
        if config.checkpoint.trust_unverified:
            from dsexit.train.checkpoint.files import trust_unverified_checkpoints

            trust_unverified_checkpoints()
        # On a CPU, the CPU tuning first (it may re-execute this process); a model to be compiled keeps torch's kernels.
        world, threads = setup_process(cpu_kernels=config.training.compile != "on", reexec=argv is None)
        run_dir = config.job.run_dir
        run_dir_existed = os.path.exists(run_dir)
        run = resolve_run(config, world, threads)  # every user error surfaces here, before any process group
        check_shards(run, world.local_rank)
        if not args.dry_run:
            hold_run_dir(run)  # one trainer per run directory
    except (ConfigError, OSError, StorageAccessError, DatasetFormatError, ShardCorruptError) as error:
        if world is None or world.local_rank == 0:
            if run_dir and not run_dir_existed:
                _remove_if_only_empty_dirs(run_dir)
            print(f"pretrain.py: error: {redact_text(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.dry_run:
        if world.is_main:
            print(run.to_json())
        return 0
    setup_logging(world, run.run_dir)
    log = logging.getLogger("dsexit")
    log.info("resolved config:\n%s", run.to_json())
    init_process_group(world, run.config.parallelism.dist_timeout_s)
    from dsexit.train.cluster import membership
    from dsexit.train.cluster.heartbeat import PeerWatch
    from dsexit.train.trainer import Trainer

    trainer, watch = None, None
    peer_lost_once = threading.Lock()

    def peer_lost(sentence: str) -> None:
        """A lost node, from a failed collective (main thread) or the heartbeat (its own thread): say it,
        record it for the restart, and end with code 3 at once."""
        peer_lost_once.acquire()  # never released: a second caller waits here for the first one's exit
        log.error("%s", sentence)
        membership.record_stop(run.run_dir, world, "lost peer", getattr(trainer, "step", None), lost=sentence)
        # The process group is broken: a normal exit could block in its teardown (or in the
        # data prefetch threads), and a bounded exit is the point of reporting this.
        _end(EXIT_PEER_LOST)

    try:
        run = begin_run(run)  # --start-over moves the old run aside; the run id, agreed on every rank
        world_change = membership.begin(run.run_dir, world)  # what changed since this node's last worker stopped
        watch = PeerWatch.start_for_job(world, run.config.parallelism.heartbeat_timeout_s, peer_lost)
        trainer = Trainer(run, world_change=world_change)
        reason = trainer.train()
    except CheckpointSpaceError as error:  # said by every rank that met it
        _end(EXIT_NO_SPACE, speak=redact_text(str(error)))
    except CheckpointError as error:  # the checkpoint to resume: every rank raises the same one; rank 0 says it
        _end(EXIT_USER_ERROR, speak=redact_text(str(error)) if world.is_main else None)
    except ShardCorruptError as error:  # a shard fetched mid-run (remote shards are hashed as they arrive)
        log.error("%s", redact_text(str(error)))
        _end(EXIT_USER_ERROR)
    except RuntimeError as error:  # torch.distributed.DistBackendError is one
        lost = describe_peer_failure(error, world)
        if lost is None:
            raise
        peer_lost(lost)
    if watch is not None:
        watch.stop()
    # Preempted, but no signal reached this rank, even by the end of the save: another node was preempted.
    preempted_elsewhere = reason == "preempted" and not trainer.preemption.requested
    membership.record_stop(
        run.run_dir, world, "another node was preempted" if preempted_elsewhere else reason, trainer.step
    )
    standing = trainer.standing
    if standing is None or not world.is_main:
        log.info("done (%s); run directory: %s", reason, run.run_dir)
    elif standing.learned:
        log.info("done (%s); run directory: %s; %s", reason, run.run_dir, standing.sentence())
    else:  # the last thing a user reads says that this run's model is not worth using, and what helps
        hint = (
            f" (an MLM generator sampled at temperature {run.model_config.generator_temperature:g} can keep its "
            "discriminator at the prior for a short run; at --generator-temperature 2, the smoke preset's, or with "
            "--generator uniform it learns within minutes on a CPU)"
            if standing.generator == "mlm"
            else ""
        )
        log.warning("done (%s); run directory: %s; %s%s", reason, run.run_dir, standing.sentence(), hint)
    report_stop(reason, world.local_rank)
    from dsexit.train.checkpoint.lease import release_leases

    release_leases()
    destroy_process_group()
    if preempted_elsewhere and (elastic_restarts_left() or 0) > 0:
        # Another node was preempted and saved with us. An elastic agent restarts workers that fail: exiting
        # with 3 has it re-form the job without that node, from this checkpoint, no step redone.
        log.warning(
            "another node was preempted: the checkpoint at step %d holds every rank's state; exit code 3, so that "
            "the elastic agent re-forms the job without it",
            trainer.step,
        )
        return EXIT_PEER_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
