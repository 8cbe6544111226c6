"""Bad host allocator settings are config errors, and tcmalloc is preloaded only when asked for (the
effects: tests/integration/cpu/test_allocator.py)."""

import pytest

from dsexit.cpu import allocator
from dsexit.train.config import ConfigError


def test_a_bad_setting_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "sometimes")
    with pytest.raises(ConfigError, match="DSEXIT_MALLOC_TUNING='sometimes'.*on, off"):
        allocator.keep_freed_memory()


class _Exec(Exception):
    """Raised by the stand-in for os.execve: what the process would have re-executed with."""


@pytest.fixture
def exec_calls(monkeypatch):
    calls = []

    def fake_execve(path, args, env):
        calls.append((path, args, env))
        raise _Exec

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    for name in (allocator.TCMALLOC_ENV, "DSEXIT_TCMALLOC_PRELOADED", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_tcmalloc_is_preloaded_by_re_executing_the_same_command_when_asked_for(exec_calls, monkeypatch):
    import sys

    monkeypatch.setenv(allocator.TCMALLOC_ENV, "auto")
    monkeypatch.setenv("LD_PRELOAD", "libuser.so")
    with pytest.raises(_Exec):
        allocator.preload_tcmalloc()
    ((path, args, env),) = exec_calls
    assert path == sys.executable and args == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libuser.so"  # the user's own preload stays
    assert env["DSEXIT_TCMALLOC_PRELOADED"]  # the re-executed process does not do it again


@pytest.mark.parametrize(
    "setting",
    [
        {},  # the default: tcmalloc installed, not asked for
        {"DSEXIT_TCMALLOC": ""},
        {"DSEXIT_TCMALLOC": "off"},
        {"DSEXIT_TCMALLOC": "auto", "DSEXIT_TCMALLOC_PRELOADED": "libtcmalloc_minimal.so.4"},
        {"DSEXIT_TCMALLOC": "auto", "LD_PRELOAD": "/opt/lib/libjemalloc.so.2"},  # the user chose an allocator
    ],
    ids=["unset", "empty", "off", "already-preloaded", "user-preload"],
)
def test_no_re_execution_by_default_when_off_done_or_another_allocator_is_preloaded(exec_calls, monkeypatch, setting):
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    allocator.preload_tcmalloc()
    assert exec_calls == []


def test_no_re_execution_without_tcmalloc_installed(exec_calls, monkeypatch):
    monkeypatch.setenv(allocator.TCMALLOC_ENV, "auto")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    allocator.preload_tcmalloc()
    assert exec_calls == []


def test_a_tcmalloc_path_that_is_not_a_file_is_a_config_error(exec_calls, monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.TCMALLOC_ENV, str(tmp_path / "libtcmalloc.so"))
    with pytest.raises(ConfigError, match=r"DSEXIT_TCMALLOC='.*libtcmalloc.so' is invalid; expected auto, off"):
        allocator.preload_tcmalloc()
    library = tmp_path / "libtcmalloc_custom.so"
    library.write_bytes(b"")
    monkeypatch.setenv(allocator.TCMALLOC_ENV, str(library))
    with pytest.raises(_Exec):
        allocator.preload_tcmalloc()
    assert exec_calls[0][2]["LD_PRELOAD"] == str(library)
