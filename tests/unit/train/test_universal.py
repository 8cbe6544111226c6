"""When a resume needs DeepSpeed's universal format, and that a finished conversion is not repeated."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from dsexit.train.checkpoint import universal
from dsexit.train.checkpoint.files import CheckpointRef
from dsexit.train.checkpoint.universal import convert_to_universal, needs_universal, universal_root
from dsexit.train.cluster.distributed import WorldInfo


def _ref(root, dp_size, zero_stage) -> CheckpointRef:
    return CheckpointRef(str(root), "global_step10", {"step": 10, "dp_size": dp_size, "zero_stage": zero_stage})


@pytest.mark.parametrize(
    "saved, now, needed",
    [
        ((2, 2), (2, 2), False),  # the same layout loads directly
        ((2, 2), (4, 2), True),  # another data-parallel size: ZeRO's optimizer shards no longer match
        ((4, 2), (1, 2), True),
        ((2, 1), (2, 2), True),  # another ZeRO stage
        ((2, 3), (2, 0), True),
        (("2", "2"), (2, 2), False),  # a marker written by json keeps ints; strings still compare as numbers
    ],
)
def test_needs_universal_when_the_data_parallel_size_or_zero_stage_changed(tmp_path, saved, now, needed):
    assert needs_universal(_ref(tmp_path, *saved), *now) is needed


def test_a_finished_conversion_is_reused_without_running_again(tmp_path, monkeypatch):
    ref = _ref(tmp_path, 2, 2)
    output = os.path.join(universal_root(ref), ref.tag)

    def convert(command, **kwargs):  # what ds_to_universal leaves, in miniature
        os.makedirs(os.path.join(output, "zero"), exist_ok=True)
        with open(os.path.join(output, "zero", "optimizer_state.pt"), "wb") as handle:
            handle.write(b"converted")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(universal.subprocess, "run", convert)
    world = WorldInfo(0, 1, 0, 1, "single")
    assert convert_to_universal(ref, world) == os.path.join(str(tmp_path), "universal")
    done = json.loads(open(os.path.join(output, universal._DONE)).read())
    assert set(done["files"]) == {"zero/optimizer_state.pt"} and done["tag"] == ref.tag
    monkeypatch.setattr(universal.subprocess, "run", lambda *a, **k: pytest.fail("converted again"))
    assert convert_to_universal(ref, world) == os.path.join(str(tmp_path), "universal")
