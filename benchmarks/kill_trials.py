"""Randomised kill -9 trials of `vlflow run` (used by tests/test_kill_trials.py; run directly for more trials).

Usage: .venv/bin/python benchmarks/kill_trials.py [--trials 100] [--seed 0]
Each trial starts `vlflow run` on a workflow that generates a synthetic COCO tree, converts it to Arrow, writes many
files and concatenates, SIGKILLs the whole process tree at a random moment, then checks every committed artifact
against its manifest and against an uninterrupted reference run. Prints how many trials held.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlflow.runner import content_digest
from vlflow.store import ArtifactStore

VLFLOW = str(Path(sys.executable).with_name("vlflow"))

KILL_WORKFLOW = """
name: kill_trials
stages:
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
"""


def committed_digests(store: ArtifactStore) -> dict[str, str]:
    """Stage name -> content digest of every committed artifact."""
    return {m.meta["stage"]: content_digest(m) for m in store.list()}


def verify_committed(store: ArtifactStore) -> None:
    """Every committed manifest's files exist with the recorded size and sha256 (raises AssertionError)."""
    import hashlib

    for manifest in store.list():
        root = store.materialize(manifest.key)
        for entry in manifest.files:
            data = (root / entry.path).read_bytes()
            assert len(data) == entry.size, f"{manifest.meta['stage']}: {entry.path} has the wrong size"
            assert hashlib.sha256(data).hexdigest() == entry.sha256, f"{manifest.meta['stage']}: {entry.path} differs"


def run_kill_trial(project: Path, kill_after: float | None, finish: bool = True) -> dict[str, str] | None:
    """Run the workflow in `project`; SIGKILL it after `kill_after` s (None: let it finish).

    Returns the committed digests when the run finished by itself, None when it was killed. With `finish`, a killed
    run is followed by a clean one and its digests are returned."""
    (project / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    (project / "wf.yaml").write_text(KILL_WORKFLOW)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([VLFLOW, "run", "wf.yaml"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.2)  # let children notice their parent is gone (they die with it)
        if not finish:
            return None
        return run_kill_trial(project, None)
    if proc.returncode != 0:
        raise RuntimeError(f"vlflow run failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return committed_digests(ArtifactStore(str(project / "cache")))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    held = interrupted = 0
    with tempfile.TemporaryDirectory() as tmp:
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
    print(f"{held}/{args.trials} trials held ({interrupted} interrupted mid-run); "
          f"final run {'matches' if final == expected else 'DIFFERS from'} the uninterrupted reference")
    return 0 if held == args.trials and final == expected else 1


if __name__ == "__main__":
    sys.exit(main())
