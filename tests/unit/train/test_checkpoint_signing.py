"""Signed completion markers in process (signing.py): with a key, a marker that is unsigned, signed with
another key, altered in any field, or moved to another step is refused before any file is opened, and
`latest` pointing back past a signed step is refused unless the step is named. The universal
conversion's done-marker is verified the same way. DeepSpeed is replaced by the small engine of
test_checkpoint_bookkeeping.py; the routes with real processes are in
tests/integration/train/test_checkpoint_signing.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest

from dsexit.train.checkpoint.files import (
    LATEST,
    MARKER,
    RemoteCheckpoints,
    open_checkpoint,
    resume_choice,
    verify_files,
)
from dsexit.train.checkpoint.manager import CheckpointManager
from dsexit.train.checkpoint.resume import choose_checkpoint
from dsexit.train.checkpoint.signing import KEY_FILE_ENV, canonical, load_key, sign, signed_by
from dsexit.train.checkpoint.universal import _DONE, _source_digest, convert_to_universal, verify_conversion
from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.errors import CheckpointError
from tests.helpers.checkpoints import FakeEngine

SINGLE = WorldInfo(0, 1, 0, 1, "single")


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.key"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    path.chmod(0o600)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    monkeypatch.delenv("DSEXIT_TRUST_UNVERIFIED_CHECKPOINT", raising=False)
    return path


def _saved(root, steps=(1,), location=None):
    manager = CheckpointManager(location or str(root), str(root), 10, SINGLE, run_id="run-a")
    engine = FakeEngine()
    return [manager.save(engine, step, {"step": step, "config": {"model": {"hidden_size": 8}}}) for step in steps]


def _write_marker(ref, meta):
    with open(os.path.join(ref.path, MARKER), "w") as handle:
        json.dump(meta, handle)


def test_a_signed_marker_verifies_and_names_its_key(tmp_path, key_file):
    [ref] = _saved(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "global_step1" / MARKER).read_text())
    key = load_key()
    assert meta["key_id"] == key.key_id and signed_by(meta, key)
    assert str(key_file.read_text().strip()) not in json.dumps(meta)  # the key itself is never written
    verify_files(open_checkpoint(ref.path))


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda meta: meta.pop("signature"), id="unsigned"),
        pytest.param(lambda meta: meta.update(step=7), id="step-changed"),
        pytest.param(lambda meta: meta.update(run_id="someone-else"), id="run-id-changed"),
        pytest.param(lambda meta: meta["config"]["model"].update(hidden_size=9), id="config-changed"),
        pytest.param(
            lambda meta: meta["files"]["mp_rank_00_model_states.pt"].update(sha256="0" * 64), id="digest-changed"
        ),
    ],
)
def test_every_field_is_signed_and_a_forged_marker_is_refused(tmp_path, key_file, forge):
    [ref] = _saved(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "global_step1" / MARKER).read_text())
    forge(meta)
    _write_marker(ref, meta)
    with pytest.raises(CheckpointError, match="global_step1") as refused:
        verify_files(open_checkpoint(ref.path))
    assert "not opened" in str(refused.value)


def test_another_keys_signature_and_a_marker_moved_to_another_step_are_refused(tmp_path, key_file, monkeypatch):
    first, second = _saved(tmp_path / "ckpt", steps=(1, 2))
    moved = json.loads((tmp_path / "ckpt" / "global_step2" / MARKER).read_text())
    _write_marker(first, moved)  # a valid signature, for another step
    with pytest.raises(CheckpointError, match="holds the signed marker of global_step2, not of global_step1"):
        verify_files(open_checkpoint(first.path))

    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    monkeypatch.setenv(KEY_FILE_ENV, str(other))
    with pytest.raises(CheckpointError, match="signed with key"):
        verify_files(open_checkpoint(second.path))


def test_without_the_key_in_hand_an_unsigned_marker_needs_trust_and_says_so(tmp_path, key_file, monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV)
    [ref] = _saved(tmp_path / "ckpt")  # written by a run without a key
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    with pytest.raises(CheckpointError, match="unsigned completion marker.*--trust-unverified-checkpoint"):
        verify_files(open_checkpoint(ref.path))
    monkeypatch.setenv("DSEXIT_TRUST_UNVERIFIED_CHECKPOINT", "1")
    verify_files(open_checkpoint(ref.path))  # asked for: the digests are still checked
    meta = json.loads((tmp_path / "ckpt" / "global_step1" / MARKER).read_text())
    meta["files"]["mp_rank_00_model_states.pt"]["sha256"] = "0" * 64
    _write_marker(ref, meta)
    with pytest.raises(CheckpointError, match="has sha256"):
        verify_files(open_checkpoint(ref.path))


def test_the_canonical_content_is_what_the_reader_parses(key_file):
    key = load_key()
    meta = sign({"step": 3, "tag": "global_step3", "config": {"lr": 1e-4, "betas": (0.9, 0.999)}}, key)
    parsed = json.loads(json.dumps(meta, indent=1, sort_keys=True))
    assert signed_by(parsed, key) and canonical(parsed) == canonical(meta)


@pytest.mark.parametrize("content, expected", [(None, "cannot be read"), (b"short", "at least 16")])
def test_an_unusable_key_file_is_one_error_naming_it(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    with pytest.raises(CheckpointError, match=expected) as refused:
        load_key()
    assert str(path) in str(refused.value)


def test_latest_may_not_point_back_past_a_signed_step_unless_the_step_is_named(tmp_path, key_file):
    root = tmp_path / "ckpt"
    _saved(root, steps=(1, 2, 3))
    (root / LATEST).write_text("global_step1")
    with pytest.raises(CheckpointError, match="names global_step1, older than global_step3"):
        resume_choice(str(root))
    assert choose_checkpoint(str(root / "global_step1"), str(root)).tag == "global_step1"  # named: a rollback


def test_the_mirrors_latest_may_not_point_back_past_a_signed_step(tmp_path, key_file):
    url = f"memory://signed-{uuid.uuid4().hex[:8]}/run"
    _saved(tmp_path / "staging", steps=(1, 2), location=url)
    mirror = RemoteCheckpoints(url)
    assert mirror.choice().tag == "global_step2"
    mirror.remote.fs.pipe(f"{url}/{LATEST}", b"global_step1")
    with pytest.raises(CheckpointError, match="older than global_step2"):
        choose_checkpoint("auto", str(tmp_path / "fresh"), mirror)


def test_a_universal_conversion_is_verified_before_it_is_loaded(tmp_path, key_file):
    [ref] = _saved(tmp_path / "ckpt")
    output = tmp_path / "ckpt" / "universal" / "global_step1"
    output.mkdir(parents=True)
    (output / "mp_rank_00_model_states.pt").write_bytes(b"planted")
    (output / _DONE).write_text("global_step1")  # the done-marker of an older dsexit, or planted
    with pytest.raises(CheckpointError, match="lists no file digests"):
        convert_to_universal(ref, SINGLE)
    assert (output / "mp_rank_00_model_states.pt").read_bytes() == b"planted"  # refused, nothing removed

    # A done-marker with honest digests but without the key's signature, or from another source
    digests = {"mp_rank_00_model_states.pt": {"sha256": hashlib.sha256(b"planted").hexdigest()}}
    done = {"tag": "global_step1", "source_marker_sha256": "0" * 64, "files": digests}
    (output / _DONE).write_text(json.dumps(done))
    with pytest.raises(CheckpointError, match="not made from the checkpoint"):
        verify_conversion(ref, str(output))
    (output / _DONE).write_text(json.dumps({**done, "source_marker_sha256": _source_digest(ref)}))
    with pytest.raises(CheckpointError, match="unsigned completion marker"):
        verify_conversion(ref, str(output))
    (output / _DONE).write_text(json.dumps(sign({**done, "source_marker_sha256": _source_digest(ref)}, load_key())))
    verify_conversion(ref, str(output))  # signed, from this checkpoint, files as listed
    (output / "zero").mkdir()
    (output / "zero" / "planted.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="planted.pt is not listed"):
        verify_conversion(ref, str(output))
