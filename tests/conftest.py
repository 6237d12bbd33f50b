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


def run_on_two_ranks(script_text: str, workdir, timeout: float = 300):
    """Run `script_text` (it gets `workdir` as argv[1]) as a real 2-rank torchrun launch on 127.0.0.1, one thread per
    rank; asserts it exited 0 and returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    script = workdir / "two_ranks.py"
    script.write_text(script_text)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), str(workdir)]
    proc = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


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
