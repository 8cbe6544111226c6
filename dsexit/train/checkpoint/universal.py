"""Resuming at another data-parallel size (or ZeRO stage) through DeepSpeed's universal format.

ZeRO shards optimizer state by data-parallel rank, so a checkpoint loads directly only
at the size it was saved at. Otherwise rank 0 converts it once with DeepSpeed's
`ds_to_universal` into CHECKPOINTS/universal/TAG, and the engine is built with
`"checkpoint": {"load_universal": true}`. The conversion's done-marker lists the digest of every file it
wrote and of the marker of the checkpoint it came from (signed with the checkpoint key, if one is set),
and a conversion found on disk is verified against it before the engine opens any of its files, as
the checkpoint itself is. The same conversion by hand:

    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \\
        --input_folder CHECKPOINTS/global_stepN --output_folder CHECKPOINTS/universal/global_stepN
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from typing import Callable

from dsexit.storage import atomic_write
from dsexit.train.checkpoint.files import (
    TRUST_UNVERIFIED_ENV,
    UNIVERSAL_DIR,
    CheckpointRef,
    file_digests,
    verify_listed,
)
from dsexit.train.checkpoint.signing import canonical, check_signature, load_key, sign
from dsexit.train.cluster.distributed import WorldInfo, broadcast_object, gather_objects
from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")

_DONE = "dsexit_universal_done"


def needs_universal(ref: CheckpointRef, dp_size: int, zero_stage: int) -> bool:
    """Whether `ref` was saved at another data-parallel size or ZeRO stage than these."""
    return int(ref.meta["dp_size"]) != dp_size or int(ref.meta["zero_stage"]) != zero_stage


def load_dir_of(
    ref: CheckpointRef,
    dp_size: int,
    zero_stage: int,
    world: WorldInfo,
    make_whole: Callable[[CheckpointRef], CheckpointRef] | None = None,
) -> str:
    """Where the engine loads `ref` from: its own root, or, saved at another data-parallel size or ZeRO
    stage, the root of its universal conversion (every rank waits for it). `make_whole` gives this
    node's copy of `ref` every rank's files before it is converted (`CheckpointManager.whole`)."""
    if not needs_universal(ref, dp_size, zero_stage):
        return ref.root
    return convert_to_universal(ref, world, make_whole)


def universal_root(ref: CheckpointRef) -> str:
    return os.path.join(ref.root, UNIVERSAL_DIR)


def convert_to_universal(
    ref: CheckpointRef, world: WorldInfo, make_whole: Callable[[CheckpointRef], CheckpointRef] | None = None
) -> str:
    """Convert once per disk, wait for it everywhere; returns the load_dir to pass with ref.tag.

    Rank 0 converts first (or verifies a conversion already there). Then the first rank of every other
    node looks: on a disk the nodes share it finds rank 0's conversion and verifies it; on a disk of its
    own (checkpoints staged per node and mirrored to a URL) it converts its own copy. A failure on any
    rank is raised on every rank."""
    output = os.path.join(universal_root(ref), ref.tag)
    error = _convert_or_verify(ref, output, make_whole) if world.is_main else None
    error = broadcast_object(error)
    if error is None and world.local_rank == 0 and not world.is_main:
        error = _convert_or_verify(ref, output, make_whole)
    errors = [failure for failure in gather_objects(error) if failure]
    if errors:
        raise CheckpointError(errors[0])
    return universal_root(ref)


def _convert_or_verify(
    ref: CheckpointRef, output: str, make_whole: Callable[[CheckpointRef], CheckpointRef] | None
) -> str | None:
    """This disk's conversion of `ref`, made now or verified; the failure as one sentence, else None."""
    try:
        if os.path.exists(os.path.join(output, _DONE)):
            verify_conversion(ref, output)
            return None
        if make_whole is not None:  # the other nodes' shards (checked as they arrive; this node's were at resume)
            make_whole(ref)
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
            return (
                f"ds_to_universal failed on {ref.path} (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        done = {"tag": ref.tag, "source_marker_sha256": _source_digest(ref), "files": file_digests(output, _DONE)}
        atomic_write(os.path.join(output, _DONE), json.dumps(sign(done, load_key()), indent=1, sort_keys=True))
    except CheckpointError as failure:
        return str(failure)
    return None


def _source_digest(ref: CheckpointRef) -> str:
    return hashlib.sha256(canonical(ref.meta)).hexdigest()


def verify_conversion(ref: CheckpointRef, output: str) -> None:
    """A conversion of `ref` found at `output`: its done-marker names `ref`'s marker, is signed with the
    key (if one is set), and lists every file there with its digest; CheckpointError otherwise, before
    any of them is unpickled."""
    trusted = os.environ.get(TRUST_UNVERIFIED_ENV) == "1"
    with open(os.path.join(output, _DONE)) as handle:
        text = handle.read()
    try:
        done = json.loads(text)
    except json.JSONDecodeError:
        done = None
    again = f"remove {output} and the conversion is made again from the verified {ref.tag}"
    if not isinstance(done, dict) or "files" not in done:
        if trusted:
            log.warning("universal conversion %s lists no file digests; loading it unverified, as asked", output)
            return
        raise CheckpointError(
            f"universal conversion {output} lists no file digests (made by an older dsexit, or planted): its files "
            f"are not opened; {again}."
        )
    if done.get("source_marker_sha256") != _source_digest(ref):
        raise CheckpointError(
            f"universal conversion {output} was not made from the checkpoint {ref.path} as it is now; {again}."
        )
    key = load_key()
    if key is not None:
        check_signature(done, ref.tag, output, key, trusted)
    verify_listed(output, done["files"], marker=_DONE)
