"""The runner -> stage process boundary: one typed payload, and no secret of a stage's params left on disk in clear
(under the cache or state dirs) while the stage runs or after the run."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydantic
import pytest

from tests.conftest import write_project_config
from vlflow.errors import LaunchError
from vlflow.payload import PLACEHOLDER_PREFIX, SECRETS_ENV, PayloadPipe, StagePayload

PASSWORD = "Sup3rS3cretPw0rd"
TOKEN = "tok-6f1d2c9ab0e4"  # interpolated from a secret-looking environment variable

WORKFLOW = f"""
name: secrets
stages:
  url:
    uses: testing.write
    with: {{files: 0, text: "https://reader:{PASSWORD}@data.example.com/set", sleep: 1.5}}
  token:
    uses: testing.write
    with: {{files: 0, text: "${{env.VLFLOW_TEST_API_TOKEN}}", sleep: 1.5}}
"""


def test_payload_file_is_private_and_typed(tmp_path):
    payload = StagePayload(stage="s", uses="testing.write", params={"text": PASSWORD}, inputs={"a": "/x/y"},
                           output_dir=tmp_path / "out")
    path = payload.write(tmp_path / "payload.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # created so: never readable by others, not even briefly
    with pytest.raises(FileExistsError):  # never writes into a file someone else made
        payload.write(path)
    read = StagePayload.read(path)
    assert read == payload and read.inputs["a"] == Path("/x/y") and read.launch is None
    with pytest.raises(pydantic.ValidationError):
        StagePayload.of(json.loads(path.read_text()) | {"unknown": 1})


def test_payload_pipe_hands_the_payload_over_without_a_file(tmp_path):
    payload = StagePayload(stage="s", uses="testing.write", params={"text": PASSWORD}, inputs={},
                           output_dir=tmp_path / "out")
    pipe = PayloadPipe(payload, tmp_path / "payload.json")
    assert stat.S_ISFIFO((tmp_path / "payload.json").stat().st_mode)
    assert StagePayload.read(tmp_path / "payload.json") == payload
    pipe.close()
    unread = PayloadPipe(payload, tmp_path / "unread.json")  # its stage died before reading: close never hangs
    started = time.monotonic()
    unread.close()
    assert time.monotonic() - started < 5 and not unread.thread.is_alive()
    assert list(tmp_path.iterdir()) == []


def _files_holding(roots: list[Path], secrets: tuple[str, ...]) -> list[str]:
    found = []
    for root in roots:
        for directory, _, files in os.walk(root):  # dirs vanishing meanwhile (a commit, a cleanup) are skipped
            for name in files:
                path = Path(directory) / name
                try:  # a FIFO holds nothing on disk (and reading it would take a stage's payload)
                    data = path.read_bytes() if stat.S_ISREG(path.lstat().st_mode) else b""
                except OSError:  # removed meanwhile
                    continue
                found += [f"{directory}/{name}: {s}" for s in secrets if s.encode() in data]
    return found


def _run_scanning(project: Path, env: dict, secrets: tuple[str, ...]) -> tuple[str, list[str], list[str]]:
    """`vlflow run wf.yaml` in `project`, its cache and state dirs scanned for `secrets` while it runs: (output,
    leaks found, regular payload files seen)."""
    roots = [project / "cache", project / "state"]
    run = subprocess.Popen([sys.executable, "-m", "vlflow", "run", "wf.yaml", "--jobs", "2"], cwd=project, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_running, leaks, payload_files = False, [], []
    while run.poll() is None:
        staging = project / "state" / "staging"
        # a stage is running once its output dir exists (its payload was written just before)
        seen_running |= staging.is_dir() and any(staging.glob("*/output"))
        leaks += _files_holding(roots, secrets)
        for path in staging.glob("*/payload.json") if staging.is_dir() else ():
            try:
                if stat.S_ISREG(path.lstat().st_mode):
                    payload_files.append(path.read_text())
            except OSError:  # removed meanwhile
                pass
        time.sleep(0.05)
    out = run.stdout.read()
    assert run.returncode == 0, out
    assert seen_running, "the scan never saw a stage running"
    leaks += _files_holding(roots, secrets)
    assert not any(secret in out for secret in secrets), out
    return out, leaks, payload_files


def test_no_secret_of_a_param_is_written_in_clear_while_a_stage_runs_or_after(tmp_path):
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    env = dict(os.environ, VLFLOW_TEST_API_TOKEN=TOKEN)
    _, leaks, _ = _run_scanning(tmp_path, env, (PASSWORD, TOKEN))
    assert leaks == [], leaks
    # what the cache records of the params is masked, and an unchanged rerun is still cached
    show = subprocess.run([sys.executable, "-m", "vlflow", "show", "wf.yaml", "url"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert "reader:***@" in show.stdout or "***@data.example.com" in show.stdout, show.stdout
    again = subprocess.run([sys.executable, "-m", "vlflow", "run", "wf.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "0 ran, 2 cached" in again.stdout, again.stdout
    # a changed secret reruns the stage (its key covers the clear value) and says why without showing it
    changed = subprocess.run([sys.executable, "-m", "vlflow", "plan", "wf.yaml"], cwd=tmp_path,
                             env=dict(env, VLFLOW_TEST_API_TOKEN="tok-000000000000", COLUMNS="250"),
                             capture_output=True, text=True)
    assert "token │ testing.write │ run" in changed.stdout, changed.stdout
    assert "secret param may have changed" in changed.stdout, changed.stdout
    assert TOKEN not in changed.stdout


def test_a_distributed_stage_gets_its_secret_params_through_the_environment_not_the_disk(tmp_path):
    """torchrun, 2 ranks: the payload file holds a placeholder, the ranks get the clear value (its digest comes back
    in the metrics), and no file under the cache or state dirs ever holds the password."""
    write_project_config(tmp_path)
    url = f"https://reader:{PASSWORD}@data.example.com/set"
    (tmp_path / "wf.yaml").write_text(f"""
name: secrets_ddp
stages:
  train:
    uses: testing.train
    with: {{steps: 2, checkpoint_every: 2, text: "{url}"}}
    launch: {{nproc_per_node: 2, backend: gloo}}
""")
    _, leaks, payload_files = _run_scanning(tmp_path, dict(os.environ, OMP_NUM_THREADS="1"), (PASSWORD,))
    assert leaks == [], leaks
    assert payload_files and all(PLACEHOLDER_PREFIX in text for text in payload_files), payload_files
    metrics = [json.loads(path.read_text()) for path in (tmp_path / "cache").rglob("metrics.json")]
    assert [m["text_sha256"] for m in metrics] == [hashlib.sha256(url.encode()).hexdigest()], metrics
    assert metrics[0]["world_size"] == 2


def test_sealed_payload_round_trip_and_a_missing_secret_is_an_error(tmp_path, monkeypatch):
    payload = StagePayload(stage="s", uses="testing.write", inputs={}, output_dir=tmp_path,
                           params={"url": f"https://u:{PASSWORD}@h/x", "nested": {"password": "pw-123456789"},
                                   "plain": "keep", "n": 3})
    masked = {"url": "https://u:***@h/x", "nested": {"password": "***"}, "plain": "keep", "n": 3}
    sealed, clear = payload.sealed(masked)
    assert PASSWORD not in sealed.model_dump_json() and "pw-123456789" not in sealed.model_dump_json()
    assert sealed.params["plain"] == "keep" and sealed.params["n"] == 3 and len(clear) == 2
    monkeypatch.setenv(SECRETS_ENV, json.dumps(clear))
    assert sealed.unsealed() == payload
    assert SECRETS_ENV not in os.environ  # the stage's code never sees it
    with pytest.raises(LaunchError, match="did not reach this process"):
        sealed.unsealed()
