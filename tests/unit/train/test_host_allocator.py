"""A bad host allocator setting is a config error (its effect: tests/integration/train/test_host_allocator.py)."""

import pytest

from dsexit.train import host_allocator
from dsexit.train.config import ConfigError


def test_a_bad_setting_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.setenv(host_allocator.ENV, "sometimes")
    with pytest.raises(ConfigError, match="DSEXIT_MALLOC_TUNING='sometimes'.*on, off"):
        host_allocator.keep_freed_memory()
