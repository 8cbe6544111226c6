"""The unit tier's one rule, enforced: tests here run in this process. A test that starts a child
process (subprocess, multiprocessing) fails and belongs in tests/integration/."""

from __future__ import annotations

import multiprocessing.process
import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_child_processes(monkeypatch, request):
    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a child process; unit tests run in process (move it to tests/integration/)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
