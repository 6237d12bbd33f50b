"""Randomised kill -9 trials of `vlflow run` (used by tests/e2e/test_kill_trials.py; run directly for more trials).

Usage: .venv/bin/python benchmarks/kill_trials.py [--trials 100] [--seed 0]
Each trial starts `vlflow run` on a workflow that downloads a file from a slow HTTP server on 127.0.0.1, trains on it
(2-process gloo launch with checkpoints), generates a synthetic COCO tree, converts it to Arrow, writes many files and
concatenates, SIGKILLs the whole process tree at a random moment, then checks every committed artifact against its
manifest and against an uninterrupted reference run. Prints how many trials held.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from vlflow.stages.testing.http_files import RangeFileHandler, serve

from vlflow.plan import content_digest
from vlflow.procs import processes_mentioning
from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

DOWNLOAD_BYTES = random.Random(7).randbytes(3 << 20)
DOWNLOAD_RATE = 2 << 20  # bytes/s: the download lasts ~1.5 s, long enough for kills to land inside it
KILL_WORKFLOW = """
name: kill_trials
stages:
  fetch:
    uses: download
    with:
      files: [{url: "${env.KILL_TRIAL_URL}", path: blob.bin, sha256: SHA256}]
      chunk_bytes: 65536
  train:
    uses: testing.train
    inputs: {data: fetch/blob.bin}
    with: {steps: 30, checkpoint_every: 5, sleep: 0.05}
    launch: {nproc_per_node: 2}
  images:
    uses: synthetic.coco
    with: {num_images: 60, image_size: 64, threads: 1}
  arrows:
    uses: arrow.coco_karpathy
    inputs: {root: images}
    with: {batch_rows: 8, read_threads: 2}
  many_files:
    uses: testing.write
    with: {files: 3000, size: 256}
  joined:
    uses: testing.concat
    inputs: {a: many_files, b: arrows/report.json}
""".replace("SHA256", hashlib.sha256(DOWNLOAD_BYTES).hexdigest())
# Parts of an artifact that must match the reference byte for byte. A training stage's metrics.jsonl and TensorBoard
# events record wall-clock times and where it resumed, so for it only the trained weights are compared.
COMPARED_PREFIX = {"train": "model/"}


class SlowFileHandler(RangeFileHandler):
    """Serves DOWNLOAD_BYTES at /blob.bin at DOWNLOAD_RATE, with HTTP Range support (so a killed download resumes)."""

    files = {"blob.bin": DOWNLOAD_BYTES}

    def send_body(self, mode: str, data: bytes, start: int, range_header: str | None) -> None:
        chunk = 64 << 10
        try:
            for offset in range(start, len(data), chunk):
                self.wfile.write(data[offset:offset + chunk])
                time.sleep(chunk / DOWNLOAD_RATE)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            pass


@contextmanager
def serving_download():
    """A SlowFileHandler server on 127.0.0.1 for the duration; sets KILL_TRIAL_URL for the runs it wraps."""
    previous = os.environ.get("KILL_TRIAL_URL")
    with serve(SlowFileHandler) as base_url:
        os.environ["KILL_TRIAL_URL"] = f"{base_url}/blob.bin"
        try:
            yield os.environ["KILL_TRIAL_URL"]
        finally:
            if previous is None:
                os.environ.pop("KILL_TRIAL_URL", None)
            else:
                os.environ["KILL_TRIAL_URL"] = previous


def committed_digests(store: ArtifactStore) -> dict[str, str]:
    """Stage name -> digest of the compared content of every committed artifact (from manifests; nothing is read)."""
    digests = {}
    for manifest in store.list():
        stage = manifest.meta["stage"]
        prefix = COMPARED_PREFIX.get(stage)
        if prefix is None:
            digests[stage] = content_digest(manifest)
        else:
            parts = sorted(f"{e.path}:{e.sha256}" for e in manifest.files if e.path.startswith(prefix))
            assert parts, f"{stage}: no {prefix} files in its artifact"
            digests[stage] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return digests


def verify_committed(store: ArtifactStore) -> None:
    """Every committed manifest's files exist with the recorded size and sha256 (raises AssertionError)."""
    import hashlib

    for manifest in store.list():
        root = store.materialize(manifest.key)
        for entry in manifest.files:
            data = (root / entry.path).read_bytes()
            assert len(data) == entry.size, f"{manifest.meta['stage']}: {entry.path} has the wrong size"
            assert hashlib.sha256(data).hexdigest() == entry.sha256, f"{manifest.meta['stage']}: {entry.path} differs"


def interrupted_work(project: Path) -> set[str]:
    """What a killed run left to resume in its work dirs: "download" (a partial file), "training" (a checkpoint)."""
    work = project / "state" / "work"
    found = set()
    if any(part.stat().st_size for part in work.glob("*/partial/*.part")):
        found.add("download")
    if any(work.glob("*/checkpoints/step_*")):
        found.add("training")
    return found


def run_kill_trial(project: Path, kill_after: float | None, finish: bool = True,
                   kill_when: Callable[[Path], bool] | None = None) -> dict[str, str] | None:
    """Run the workflow in `project`; SIGKILL it after `kill_after` s, or as soon as `kill_when(project)` holds
    (neither: let it finish).

    Returns the committed digests when the run finished by itself, None when it was killed. With `finish`, a killed
    run is followed by a clean one and its digests are returned."""
    (project / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    (project / "wf.yaml").write_text(KILL_WORKFLOW)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + (kill_after if kill_after is not None else 600)
    kill = False
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            kill = kill_after is not None or kill_when is not None
            break
        if kill_when is not None and kill_when(project):
            kill = True
            break
        time.sleep(0.02)
    if kill:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Children (stages, torchrun, its ranks — even ranks still starting up) die with their parents, within moments
        deadline = time.monotonic() + 10
        while processes_mentioning(str(project)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_mentioning(str(project))
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes outlived the killed run: {left}")
        if not finish:
            return None
        return run_kill_trial(project, None)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("vlflow run did not finish within 600 s")
    if proc.returncode != 0:
        raise RuntimeError(f"vlflow run failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    # a complete run sweeps what killed runs left in staging and removes its own staging dirs
    leftover = [p.name for p in (project / "state" / "staging").glob("[!.]*")]
    if leftover:
        raise AssertionError(f"staging dirs remain after a complete run: {leftover}")
    return committed_digests(ArtifactStore(str(project / "cache")))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    held = interrupted = 0
    left = {"download": 0, "training": 0}  # kills that left a partial download / a training checkpoint to resume
    with tempfile.TemporaryDirectory() as tmp, serving_download():
        reference_dir = Path(tmp) / "reference"
        reference_dir.mkdir()
        started = time.monotonic()
        expected = run_kill_trial(reference_dir, None)
        full_run = time.monotonic() - started  # kill moments fall inside one uninterrupted run
        project = Path(tmp) / "killed"
        project.mkdir()
        for trial in range(args.trials):
            killed = run_kill_trial(project, rng.uniform(0.2, 0.9 * full_run), finish=False) is None
            interrupted += killed
            for kind in interrupted_work(project) if killed else ():
                left[kind] += 1
            store = ArtifactStore(str(project / "cache"))
            try:
                verify_committed(store)
                ok = all(expected[s] == d for s, d in committed_digests(store).items())
            except AssertionError:
                ok = False
            held += ok
            if not killed:  # the workflow completed: start over so the next kills hit stages mid-run again
                store.gc(keep=set())
        final = run_kill_trial(project, None)
    print(f"{held}/{args.trials} trials held ({interrupted} interrupted mid-run; after {left['download']} of those "
          f"kills a partial download waited to be resumed, after {left['training']} a training checkpoint); "
          f"final run {'matches' if final == expected else 'DIFFERS from'} the uninterrupted reference")
    return 0 if held == args.trials and final == expected else 1


if __name__ == "__main__":
    sys.exit(main())
