"""Shared fixtures. Keep each fixture small and documented; put topic-specific helpers in the test module itself."""
from __future__ import annotations

import logging
import socket
import uuid

import pytest

# Dummy credentials for the in-process moto S3 server (it accepts any).
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def write_project_config(root) -> None:
    """A vlflow.toml in `root` with the cache and state dirs inside it (`cache/`, `state/`)."""
    (root / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL (http://127.0.0.1:PORT) of an S3 server (moto) running in this process for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in failure reports
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Environment for S3 access to the moto server: dummy credentials, endpoint via VLFLOW_/FSSPEC_S3_ENDPOINT_URL.

    Child processes (CLI, stage runners) inherit it, so they reach the same server.
    """
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("VLFLOW_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", moto_server)
    return moto_server


def create_bucket(endpoint_url: str, name: str | None = None) -> str:
    import boto3

    name = name or f"vlflow-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_cache_url(s3_env):
    """`s3://<fresh bucket>/cache` on the moto server; the environment from `s3_env` is set."""
    return f"s3://{create_bucket(s3_env)}/cache"
