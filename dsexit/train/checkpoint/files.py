"""What a checkpoint is on disk: tags, the completion marker, file digests, and which one a
directory offers a resume. Functions that read a checkpoint root (and a mirror's markers);
saving is manager.py's, uploads mirror.py's, retention retention.py's, and the choice
between this directory, the mirror and a path resume.py's.

    latest                         tag of the checkpoint `--resume auto` continues from
    global_step100/                DeepSpeed's sharded files for step 100, plus
        dsexit_checkpoint.json     the completion marker: step, run id, world size, ZeRO
                                   stage, resolved config, and the size and sha256 of every
                                   file of the step
    universal/global_step100/      a universal conversion (see universal.py)

A checkpoint is complete when its marker exists and parses; a malformed marker is
reported as malformed. `--resume auto` takes the checkpoint `latest` names (the newest
complete one if `latest` names none), so a rollback is followed even while newer steps
of the abandoned line remain (with a key, not past a newer signed step: `check_latest`). Before anything
unpickles a checkpoint file, `verify_files` checks the marker's signature where a key is set
(signing.py), then each file against the marker's digests, and refuses files the marker does not list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from dsexit.storage import RetryPolicy, file_sha256, local_path
from dsexit.train.checkpoint.signing import check_signature, load_key, signed_by
from dsexit.train.checkpoint.store import RemoteMirror
from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")

TAG_PREFIX = "global_step"
MARKER = "dsexit_checkpoint.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"
_TAG = re.compile(rf"^{TAG_PREFIX}(\d+)$")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def file_digests(tag_dir: str, marker: str = MARKER) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} of every file of a tag directory but its marker."""
    digests = {}
    for dirpath, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, tag_dir).replace(os.sep, "/")
            if relative != marker:
                digests[relative] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    return digests


@dataclass(frozen=True)
class CheckpointRef:
    root: str
    tag: str
    meta: dict[str, Any]

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")


def parse_marker(text: str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"the completion marker {where} is malformed ({error}); expected the JSON a dsexit save writes."
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(
            f'the completion marker {where} is malformed (no integer "step"); expected the JSON a dsexit save writes.'
        )
    return meta


def saved_model_config(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The model config a checkpoint's marker holds (in its resolved run config; older markers kept a copy)."""
    return ((meta.get("config") or {}).get("model")) or meta.get("model_config")


def read_marker(tag_dir: str) -> dict[str, Any] | None:
    """The marker of a tag directory; None if it has none; CheckpointError if it is malformed."""
    path = os.path.join(tag_dir, MARKER)
    try:
        with open(path) as handle:
            text = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return parse_marker(text, path)


def valid_marker(tag_dir: str) -> dict[str, Any] | None:
    """The marker, or None if it is missing or malformed (a warning says which)."""
    try:
        return read_marker(tag_dir)
    except CheckpointError as error:
        log.warning("%s", error)
        return None


def complete_checkpoints(root: str) -> list[CheckpointRef]:
    """Complete checkpoints under a root, oldest first (a malformed marker counts as incomplete)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        # Not there (yet), or gone again: on a fresh run another rank's storage probe may be removing
        # the directory it created at this very moment.
        return []
    refs = []
    for name in names:
        if _TAG.match(name) and (meta := valid_marker(os.path.join(root, name))) is not None:
            refs.append(CheckpointRef(root, name, meta))
    return sorted(refs, key=lambda ref: ref.step)


def newest_complete(root: str) -> CheckpointRef | None:
    refs = complete_checkpoints(root)
    return refs[-1] if refs else None


def read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as handle:
            return handle.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def resume_choice(root: str) -> CheckpointRef | None:
    """What `--resume auto` continues from here: the checkpoint `latest` names if it is complete, else
    the newest complete. With a key, `latest` may not fall behind the newest signed checkpoint
    (`check_latest`)."""
    latest = read_latest(root)
    if latest and _TAG.match(latest) and (meta := read_marker(os.path.join(root, latest))) is not None:
        return check_latest(CheckpointRef(root, latest, meta), complete_checkpoints(root), os.path.join(root, LATEST))
    return newest_complete(root)


def check_latest(chosen: CheckpointRef, complete: list[CheckpointRef], where: str) -> CheckpointRef:
    """`chosen` (the step `latest` names), unless a key is set and a newer step is signed with it: a
    rollback moves the newer steps aside, so a `latest` pointing back past a signed step was written by
    someone else, and rolling back must be asked for by naming the step (CheckpointError)."""
    key = load_key()
    if key is None:
        return chosen
    newer = [ref for ref in complete if ref.step > chosen.step and signed_by(ref.meta, key)]
    if newer:
        raise CheckpointError(
            f"{where} names {chosen.tag}, older than {newer[-1].tag}, which is signed with the checkpoint key: "
            f"a rollback is never taken from `latest` alone; name the step to roll back to "
            f"(--resume .../{chosen.tag}) or remove the newer steps."
        )
    return chosen


def open_checkpoint(path: str) -> CheckpointRef:
    """A checkpoint given by the user: a tag directory, or a root (the one `latest` names)."""
    path = local_path(path).rstrip("/")
    meta = read_marker(path)
    if meta is not None:
        return CheckpointRef(os.path.dirname(path) or ".", os.path.basename(path), meta)
    ref = resume_choice(path)
    if ref is None:
        what = (
            "does not exist"
            if not os.path.exists(path)
            else f"is neither a complete checkpoint (no {MARKER}) nor a directory holding one"
        )
        raise FileNotFoundError(f"{path} {what}.")
    return ref


TRUST_UNVERIFIED_ENV = "DSEXIT_TRUST_UNVERIFIED_CHECKPOINT"  # set by --trust-unverified-checkpoint
TRUST_UNVERIFIED_HELP = (
    "load a checkpoint whose completion marker lists no file digests (saved by an older dsexit); its files "
    "are unpickled unverified, which runs any code planted in them: only for checkpoints you trust"
)


def trust_unverified_checkpoints() -> None:
    """The user's `--trust-unverified-checkpoint`: for this process and those it starts."""
    os.environ[TRUST_UNVERIFIED_ENV] = "1"


def verify_files(ref: CheckpointRef, allow_missing: bool = False) -> None:
    """The checkpoint's marker signed with the key, if one is set (signing.py), and every file as the
    marker lists it; raises CheckpointError naming the first that differs, is missing, or is not listed.
    A marker without digests (from before them), or unsigned where a key is set, is refused unless the
    user trusts it (`--trust-unverified-checkpoint`, which sets TRUST_UNVERIFIED_ENV).

    `allow_missing`: a node's staging copy of a mirrored checkpoint holds only the files its own
    ranks wrote (and DeepSpeed opens only those); the files it holds must still match."""
    trusted = os.environ.get(TRUST_UNVERIFIED_ENV) == "1"
    key = load_key()
    if key is not None:
        check_signature(ref.meta, ref.tag, ref.path, key, trusted)
    verify_listed(ref.path, ref.meta.get("files"), allow_missing, trusted)


def verify_listed(
    path: str, listed: dict[str, Any] | None, allow_missing: bool = False, trusted: bool = False, marker: str = MARKER
) -> None:
    """The files under `path` (but its `marker`) against `listed` ({relative path: {"sha256", "bytes"}}),
    as `verify_files` describes."""
    if listed is None:
        if trusted:
            log.warning("checkpoint %s has no file digests; loading it unverified, as asked", path)
            return
        raise CheckpointError(
            f"checkpoint {path} has no file digests in its completion marker (saved by an older dsexit, or "
            "edited): its files are not opened, since unpickling a planted file runs code; pass "
            "--trust-unverified-checkpoint to load it anyway if you trust where it came from."
        )
    present = file_digests(path, marker)
    for relative, expected in sorted(listed.items()):
        got = present.get(relative)
        if got is None and allow_missing:
            continue
        if got is None:
            raise CheckpointError(
                f"checkpoint file {os.path.join(path, relative)} is missing; its completion marker lists it."
            )
        if got["sha256"] != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {os.path.join(path, relative)} has sha256 {got['sha256']}, "
                f"but its completion marker records {expected['sha256']}; the file was changed or "
                f"damaged after the save."
            )
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise CheckpointError(
            f"checkpoint file {os.path.join(path, unlisted[0])} is not listed in the "
            f"completion marker; remove it (it was not written by this save)."
        )


def _by_step(ref: CheckpointRef) -> int:
    return ref.step


class RemoteCheckpoints:
    """The complete checkpoints on a mirror, by their markers (nothing downloaded)."""

    def __init__(self, url: str, policy: RetryPolicy | None = None):
        self.remote = RemoteMirror(url, policy)

    def markers(self) -> dict[str, dict[str, Any]]:
        """{tag: marker} of the complete checkpoints on the mirror (malformed markers skipped)."""
        markers = {}
        for tag in self.remote.tags():
            if _TAG.match(tag) and (text := self.remote.read_text(f"{tag}/{MARKER}")) is not None:
                try:
                    markers[tag] = parse_marker(text, f"{self.remote.shown}/{tag}/{MARKER}")
                except CheckpointError as error:
                    log.warning("%s", error)
        return markers

    def choice(self, markers: dict[str, dict[str, Any]] | None = None) -> CheckpointRef | None:
        """What `--resume auto` would take from the mirror (given its `markers`, else read): the tag its
        `latest` names if complete, else the newest complete."""
        markers = self.markers() if markers is None else markers
        if not markers:
            return None
        latest = (self.remote.read_text(LATEST) or "").strip()
        refs = sorted((CheckpointRef(self.remote.url, tag, meta) for tag, meta in markers.items()), key=_by_step)
        if latest in markers:
            return check_latest(
                CheckpointRef(self.remote.url, latest, markers[latest]), refs, f"{self.remote.shown}/{LATEST}"
            )
        return refs[-1]

    def steps(self) -> list[int]:
        return sorted(meta["step"] for meta in self.markers().values())
