"""A training stage killed (SIGKILL of the whole `vlflow run` tree) after a checkpoint resumes on the next run and ends
with exactly the weights of an uninterrupted run: same step, same data order, same masks/negatives/dropout, optimizer,
scheduler (and, for UniTAB, EMA) restored. Real stages (vilt.pretrain, unitab.pretrain), tiny models, 2 gloo ranks."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TEST_DATA, write_project_config
from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

WORKFLOWS = TEST_DATA / "workflows"


def _weights(store: ArtifactStore, stage: str) -> dict[str, torch.Tensor]:
    """Every tensor the committed artifact of `stage` holds (safetensors and torch.save files), keyed by file/name."""
    manifest = next(m for m in store.list() if m.meta["stage"] == stage)
    root = store.materialize(manifest.key)
    tensors = {}
    for entry in manifest.files:
        path = root / entry.path
        if path.suffix == ".safetensors":
            loaded = load_file(str(path))
        elif path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            continue
        tensors.update({f"{entry.path}:{name}": value for name, value in loaded.items()})
    assert tensors, f"{stage}: no weight files in {[e.path for e in manifest.files]}"
    return tensors


def _run(project: Path, *args: str, kill_when=None, timeout: float = 400) -> subprocess.CompletedProcess | None:
    """`vlflow run wf.yaml --until pretrain ARGS` in `project`; with `kill_when`, SIGKILL the whole tree once it
    holds (returns None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml", "--until", "pretrain", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return None
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    out = proc.stdout.read()
    assert kill_when is None, f"the run ended before it could be killed:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.dist
@pytest.mark.parametrize("workflow", ["small_vilt.yaml", "small_unitab.yaml"], ids=["vilt", "unitab"])
def test_killed_pretraining_resumes_to_the_uninterrupted_weights(tmp_path, workflow):
    project = tmp_path / "project"
    project.mkdir()
    write_project_config(project)
    shutil.copy(WORKFLOWS / workflow, project / "wf.yaml")
    store = ArtifactStore(str(project / "cache"))

    def checkpoint_committed_at_step_10() -> bool:
        for pointer in (project / "state" / "work").glob("*/checkpoints/latest"):
            try:
                if int(pointer.read_text().strip().split("_")[1]) >= 10:
                    return True
            except (OSError, ValueError, IndexError):  # being replaced right now
                pass
        return False

    assert _run(project, kill_when=checkpoint_committed_at_step_10) is None
    assert "pretrain" not in {m.meta["stage"] for m in store.list()}  # killed: nothing of it committed
    resumed_run = _run(project)
    assert ", 1 ran," in resumed_run.stdout, resumed_run.stdout  # data, arrows, tokenizer: cached
    logs = [p.read_text() for p in (project / "cache").rglob("stage.log")]
    resumed_at = [int(m) for text in logs for m in re.findall(r"resumed from checkpoint \S+ \(step (\d+)\)", text)]
    assert resumed_at and resumed_at[0] >= 10, logs
    resumed = _weights(store, "pretrain")

    # the same stage uninterrupted, from scratch (a separate state dir holds no checkpoint), into the same cache
    _run(project, "--force", "pretrain", "--state-dir", str(tmp_path / "fresh_state"))
    uninterrupted = _weights(store, "pretrain")
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in resumed if not torch.equal(resumed[name], uninterrupted[name])]
    assert not different, (f"{len(different)} of {len(resumed)} resumed tensors differ from the uninterrupted run's, "
                           f"in {sorted({name.split(':')[0] for name in different})}: {different[:5]}")
