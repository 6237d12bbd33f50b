"""Secret params of a distributed stage under mpirun: the payload file holds placeholders, and the clear values
reach every rank through the launcher's environment (Open MPI exports only what `-x` names)."""
from __future__ import annotations

import hashlib
import json

from vlflow.launch import build_command, run_distributed
from vlflow.payload import SECRETS_ENV, StagePayload
from vlflow.stage import LaunchSpec, get_spec

PASSWORD = "Mp1S3cretPassw0rd"


def test_mpirun_exports_the_secrets_variable_by_name_only(tmp_path):
    command = build_command(LaunchSpec(launcher="mpirun", nproc_per_node=2), tmp_path / "p.json", python="py",
                            forward_env=[SECRETS_ENV])
    assert command[command.index(SECRETS_ENV) - 1] == "-x"


def test_mpirun_ranks_get_the_clear_secret_from_the_environment(tmp_path):
    url = f"https://reader:{PASSWORD}@data.example.com/set"
    launch = LaunchSpec(launcher="mpirun", nproc_per_node=2, backend="gloo")
    payload = StagePayload(stage="train", uses="testing.train", params={"steps": 2, "checkpoint_every": 2, "text": url},
                           inputs={}, output_dir=tmp_path / "out", work_dir=tmp_path / "work", launch=launch)
    (tmp_path / "work").mkdir()
    sealed, clear = payload.sealed({"steps": 2, "checkpoint_every": 2, "text": "https://reader:***@data.example.com/set"})
    path = sealed.write(tmp_path / "payload.json")
    metrics = run_distributed(get_spec("testing.train"), path, launch, tmp_path / "log.txt",
                              env={"OMP_NUM_THREADS": "1", SECRETS_ENV: json.dumps(clear)})
    assert metrics["text_sha256"] == hashlib.sha256(url.encode()).hexdigest() and metrics["world_size"] == 2
    for written in [path, tmp_path / "log.txt", *tmp_path.rglob("*")]:
        assert not written.is_file() or PASSWORD.encode() not in written.read_bytes(), written
