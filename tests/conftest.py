"""Shared fixtures. Keep each fixture small and documented; put topic-specific helpers in the test module itself."""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

# The repository root and the test fixtures dir (tests mirror the package in sub-folders, so paths come from here).
REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"

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


# ---------------------------------------------------------------------------------------------------------------
# A real Slurm cluster and Open MPI (scripts/cluster/). CI (.ci/run) starts the cluster and sets
# VLFLOW_TEST_SLURM_ENV to its env.sh; elsewhere the fixture starts its own. A missing cluster or mpirun fails the tests
# that need it (never a skip), saying how to get it.

CLUSTER_SCRIPTS = REPO_ROOT / "scripts" / "cluster"


def missing_cluster_piece(reason: str):
    """Fail the test that needs the cluster; `reason` says what is missing and how to get it."""
    pytest.fail(f"{reason} (or run .ci/run, which installs and starts the test cluster)", pytrace=False)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables an env.sh of scripts/cluster/start.sh exports (`export A=1 B=2` lines)."""
    variables = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            variables.update(word.split("=", 1) for word in words[1:])
    return variables


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The environment (SLURM_CONF and Open MPI settings) of a running 2-node Slurm cluster on this host: the one named
    by VLFLOW_TEST_SLURM_ENV (an env.sh), else one started for this session with scripts/cluster/start.sh (root and
    Slurm installed) and stopped at its end. Pass it to subprocesses: `env=dict(os.environ, **slurm_cluster)`."""
    own_dir = None
    if os.environ.get("VLFLOW_TEST_SLURM_ENV"):
        env_file = Path(os.environ["VLFLOW_TEST_SLURM_ENV"])
        if not env_file.is_file():
            missing_cluster_piece(f"VLFLOW_TEST_SLURM_ENV names {env_file}, which does not exist")
    elif shutil.which("slurmctld") is None or shutil.which("srun") is None:
        missing_cluster_piece("Slurm is not installed: run scripts/cluster/install.sh as root")
    elif os.geteuid() != 0:
        missing_cluster_piece("starting the test cluster needs root; or set VLFLOW_TEST_SLURM_ENV to a running one")
    else:
        own_dir = tmp_path_factory.mktemp("slurm-cluster")
        started = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh"), str(own_dir)], capture_output=True,
                                 text=True, timeout=120)
        if started.returncode != 0:
            subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(own_dir)], capture_output=True, timeout=120)
            pytest.fail(f"scripts/cluster/start.sh failed:\n{started.stderr[-2000:]}", pytrace=False)
        env_file = Path(started.stdout.strip())
    cluster_env = read_env_file(env_file)
    try:
        ping = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=dict(os.environ, **cluster_env),
                              capture_output=True, text=True, timeout=15)
        if ping.returncode != 0:
            missing_cluster_piece(f"the Slurm cluster of {env_file} does not answer: {ping.stderr.strip()[-500:]}")
        yield cluster_env
    finally:
        if own_dir is not None:
            subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(own_dir)], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def mpirun_available():
    """Open MPI's mpirun is on PATH (fails instead of skipping where the cluster is required)."""
    if shutil.which("mpirun") is None:
        missing_cluster_piece("Open MPI's mpirun is not installed: run scripts/cluster/install.sh as root")
