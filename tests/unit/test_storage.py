"""dsexit.storage: redaction, retries that never print a credential, atomic writes, URLs."""

from __future__ import annotations

import json
import logging
import os

import pytest

from dsexit.storage import RetryPolicy, atomic_write, is_remote, local_path, open_url_fs, redact, redact_text


def test_redaction_masks_credentials_but_not_ordinary_fields():
    masked = redact(
        {
            "data": "s3://AKIA:hunter2@bucket/x",
            "storage": {"key": "AKIA", "secret": "hunter2"},
            "max_tokens": 5,
            "mask_token_id": 103,
            "nested": ["https://u:p@h/p"],
        }
    )
    assert "hunter2" not in json.dumps(masked) and "AKIA" not in json.dumps(masked)
    assert masked["max_tokens"] == 5 and masked["mask_token_id"] == 103


def test_redaction_masks_the_parts_of_a_urls_user_info_wherever_they_appear():
    url = "https://AKIAEXAMPLE:hunter2secret@host/data"
    text = redact_text(f"could not read {url}; the server said hunter2secret is wrong", url)
    assert "hunter2secret" not in text and "AKIAEXAMPLE" not in text and "https://***@host/data" in text


def test_retries_and_their_final_error_mask_credentials(caplog):
    url = "https://AKIAEXAMPLE:hunter2secret@host/shard.bin"
    attempts = []

    def failing():
        attempts.append(1)
        raise ConnectionError(f"cannot reach {url}")

    with caplog.at_level(logging.WARNING), pytest.raises(OSError) as raised:
        RetryPolicy(retries=2, base_delay_s=0.0).call(failing, f"reading {url}")
    assert len(attempts) == 3
    said = caplog.text + str(raised.value)
    assert "retrying" in caplog.text and "Giving up" in str(raised.value)
    assert "hunter2secret" not in said and "AKIAEXAMPLE" not in said


def test_an_s3_url_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ValueError) as raised:
        open_url_fs("s3://AKIAEXAMPLE:hunter2secret@bucket/x")
    assert "credentials" in str(raised.value) and "hunter2secret" not in str(raised.value)


def test_atomic_write_replaces_a_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text("global_step1")
    atomic_write(str(path), "global_step2")
    assert path.read_text() == "global_step2" and os.listdir(tmp_path) == ["latest"]
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(str(tmp_path / "a-directory"), "x")  # the rename fails: the temporary is removed again
    assert sorted(os.listdir(tmp_path)) == ["a-directory", "latest"]


def test_local_and_remote_urls():
    assert local_path("file:///tmp/run") == "/tmp/run" and local_path("/tmp/run") == "/tmp/run"
    assert is_remote("s3://bucket/x") and is_remote("memory://x") and not is_remote("file:///tmp/x")
