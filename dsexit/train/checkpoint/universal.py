"""Resuming at another data-parallel size (or ZeRO stage) through DeepSpeed's universal format.

ZeRO shards optimizer state by data-parallel rank, so a checkpoint loads directly only
at the size it was saved at. Otherwise rank 0 converts it once with DeepSpeed's
`ds_to_universal` into CHECKPOINTS/universal/TAG, and the engine is built with
`"checkpoint": {"load_universal": true}`. The same conversion by hand:

    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \\
        --input_folder CHECKPOINTS/global_stepN --output_folder CHECKPOINTS/universal/global_stepN
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from dsexit.storage import atomic_write
from dsexit.train.checkpoint.files import UNIVERSAL_DIR, CheckpointRef
from dsexit.train.distributed import WorldInfo, barrier

log = logging.getLogger("dsexit")

_DONE = "dsexit_universal_done"


def needs_universal(ref: CheckpointRef, dp_size: int, zero_stage: int) -> bool:
    """Whether `ref` was saved at another data-parallel size or ZeRO stage than these."""
    return int(ref.meta["dp_size"]) != dp_size or int(ref.meta["zero_stage"]) != zero_stage


def load_dir_of(ref: CheckpointRef, dp_size: int, zero_stage: int, world: WorldInfo) -> str:
    """Where the engine loads `ref` from: its own root, or, saved at another data-parallel size or ZeRO
    stage, the root of its universal conversion (made once, by rank 0; every rank waits for it)."""
    return convert_to_universal(ref, world) if needs_universal(ref, dp_size, zero_stage) else ref.root


def universal_root(ref: CheckpointRef) -> str:
    return os.path.join(ref.root, UNIVERSAL_DIR)


def convert_to_universal(ref: CheckpointRef, world: WorldInfo) -> str:
    """Convert once (rank 0), wait for it everywhere; returns the load_dir to pass with ref.tag."""
    output = os.path.join(universal_root(ref), ref.tag)
    if world.is_main and not os.path.exists(os.path.join(output, _DONE)):
        log.info(
            "checkpoint %s was saved at data-parallel size %s (ZeRO %s); converting it to the universal format in %s",
            ref.tag,
            ref.meta["dp_size"],
            ref.meta["zero_stage"],
            output,
        )
        command = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--inject_missing_state",
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--input_folder",
            ref.path,
            "--output_folder",
            output,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"ds_to_universal failed on {ref.path} (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        atomic_write(os.path.join(output, _DONE), ref.tag)
    barrier()
    return universal_root(ref)
