"""Fixtures every test folder may use: a real S3 server on 127.0.0.1 (moto's server mode).

Only integration tests use them (a server is a child process); see `tests/helpers/servers.py`.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.servers import DUMMY_CREDENTIALS, S3Server


@pytest.fixture(scope="session")
def dummy_aws_credentials():
    """Only for botocore's signing in this process; moto accepts anything. Never real credentials."""
    for key, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, dummy_aws_credentials):
    """One server for the session: tests keep to their own buckets or prefixes."""
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def restartable_s3(tmp_path, dummy_aws_credentials):
    """A server of the test's own, so stopping it cannot disturb other tests."""
    server = S3Server(tmp_path).start()
    yield server
    server.stop()
