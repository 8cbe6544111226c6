"""Signed completion markers: with a key, write access to the checkpoint store is not enough to forge a
checkpoint that loads.

Digests alone (files.py) catch a damaged or swapped file, but anyone who can write the store can
plant a pickle and write a marker with its digest. With a key file, named by the environment variable
DSEXIT_CHECKPOINT_KEY_FILE (the path, never the key, is in the environment: DeepSpeed's pdsh runner
puts exported variables on command lines), every marker carries an HMAC-SHA256 over its whole
canonical content (tag, step, run id, files with sizes and digests, config, key id), and a marker
that is unsigned, signed with another key, or altered is refused before any file of its step is
opened. The key file must be readable by the job's user on every node.

    head -c 32 /dev/urandom | base64 > ~/.dsexit-checkpoint-key && chmod 600 ~/.dsexit-checkpoint-key
    export DSEXIT_CHECKPOINT_KEY_FILE=~/.dsexit-checkpoint-key
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from dsexit.train.errors import CheckpointError

log = logging.getLogger("dsexit")

KEY_FILE_ENV = "DSEXIT_CHECKPOINT_KEY_FILE"
SIGNATURE = "signature"
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class CheckpointKey:
    secret: bytes
    path: str

    @property
    def key_id(self) -> str:
        """A public name of the key (a hash of it), recorded in every marker it signs."""
        return hashlib.sha256(b"dsexit-checkpoint-key-id\0" + self.secret).hexdigest()[:16]


def load_key() -> CheckpointKey | None:
    """The key the environment names; None without one. CheckpointError, naming the file, when it cannot
    be read or is too short to be a key."""
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        return None
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as handle:
            secret = handle.read().strip()
        mode = os.stat(path).st_mode
    except OSError as error:
        raise CheckpointError(
            f"{KEY_FILE_ENV}={path!r} cannot be read ({error.strerror}); expected a key file readable by this "
            "user on every node (head -c 32 /dev/urandom | base64 > FILE)."
        ) from None
    if len(secret) < MIN_KEY_BYTES:
        raise CheckpointError(
            f"{KEY_FILE_ENV}={path!r} holds {len(secret)} bytes; expected a key of at least {MIN_KEY_BYTES} "
            "(head -c 32 /dev/urandom | base64 > FILE)."
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("checkpoint key file %s is readable by other users (chmod 600 it)", path)
    return CheckpointKey(secret, path)


def canonical(meta: dict[str, Any]) -> bytes:
    """The marker's content as signed: every field but the signature, as sorted, compact JSON."""
    content = {name: value for name, value in meta.items() if name != SIGNATURE}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: CheckpointKey, meta: dict[str, Any]) -> str:
    return hmac.new(key.secret, canonical(meta), hashlib.sha256).hexdigest()


def sign(meta: dict[str, Any], key: CheckpointKey | None) -> dict[str, Any]:
    """`meta` with the key's id and its HMAC (unchanged without a key). `meta` must be JSON already
    (what a round trip through json gives back), since the reader recomputes the HMAC over what it parses."""
    if key is None:
        return meta
    meta = json.loads(json.dumps({**meta, "key_id": key.key_id}))
    meta.pop(SIGNATURE, None)
    return {**meta, SIGNATURE: _mac(key, meta)}


def signed_by(meta: dict[str, Any], key: CheckpointKey) -> bool:
    """Whether `meta` carries a valid HMAC under `key` (constant-time comparison)."""
    signature = meta.get(SIGNATURE)
    if not isinstance(signature, str) or meta.get("key_id") != key.key_id:
        return False
    return hmac.compare_digest(signature, _mac(key, meta))


def check_signature(meta: dict[str, Any], tag: str, where: str, key: CheckpointKey, trust_unsigned: bool) -> None:
    """Refuses (CheckpointError naming `where`) a marker not signed by `key` or signed for another tag.
    An unsigned marker passes only when the user trusts unverified checkpoints, with a warning."""
    if SIGNATURE not in meta and trust_unsigned:
        log.warning("checkpoint %s is not signed; loading it unverified, as asked", where)
        return
    if SIGNATURE not in meta:
        raise CheckpointError(
            f"checkpoint {where} has an unsigned completion marker, but {KEY_FILE_ENV} names a key: it was not "
            "written by a run holding the key, and its files are not opened (pass --trust-unverified-checkpoint "
            "to load it anyway if you trust where it came from)."
        )
    if meta.get("key_id") != key.key_id:
        raise CheckpointError(
            f"checkpoint {where} is signed with key {meta.get('key_id')!r}, not with the key in "
            f"{key.path} ({key.key_id}); its files are not opened."
        )
    if not signed_by(meta, key):
        raise CheckpointError(
            f"checkpoint {where} has a completion marker whose signature does not match its content: it was "
            "changed after the save, and its files are not opened."
        )
    if meta.get("tag") != tag:
        raise CheckpointError(
            f"checkpoint {where} holds the signed marker of {meta.get('tag')}, not of {tag}: a marker moved "
            "from another step; its files are not opened."
        )
