"""Randomised SIGKILL trials: kill `vlflow run` and every process under it at a random moment — while downloading
(HTTP on 127.0.0.1), training (2-process gloo launch), generating data, converting to Arrow, writing many files or
committing — then check that every committed artifact is complete and byte-identical to an uninterrupted run's (the
weights, for training), and that a final run completes the workflow. Two kills are aimed at resumable work first:
mid-download and mid-training after a checkpoint.

`benchmarks/kill_trials.py` holds the trial code and runs 100 trials on demand.
"""
from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path

from tests.conftest import REPO_ROOT
from vlflow.store import ArtifactStore

_spec = importlib.util.spec_from_file_location(
    "kill_trials", REPO_ROOT / "benchmarks" / "kill_trials.py")
trials = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trials)


def _check_committed(project: Path, expected: dict, trial) -> ArtifactStore:
    store = ArtifactStore(str(project / "cache"))
    trials.verify_committed(store)  # every manifest's files exist with the recorded size and sha256
    for stage, digest in trials.committed_digests(store).items():
        assert digest == expected[stage], f"trial {trial}: committed {stage} differs from the reference"
    return store


def test_random_kills_never_leave_a_partial_artifact(tmp_path: Path):
    with trials.serving_download():
        reference = tmp_path / "reference"
        reference.mkdir()
        started = time.monotonic()
        expected = trials.run_kill_trial(reference, kill_after=None)
        full_run = time.monotonic() - started  # kill moments fall inside one uninterrupted run, whatever the machine
        assert sorted(expected) == ["arrows", "fetch", "images", "joined", "many_files", "train"]

        project = tmp_path / "killed"
        project.mkdir()
        # First two kills aimed at resumable work: mid-download, then mid-training after a checkpoint. The runs
        # after them must resume both and still end with the reference bytes (the weights, for training).
        for what in ("download", "training"):
            killed = trials.run_kill_trial(project, kill_after=2 * full_run, finish=False,
                                           kill_when=lambda p, what=what: what in trials.interrupted_work(p))
            assert killed is None and what in trials.interrupted_work(project), f"no kill with {what} to resume"
            _check_committed(project, expected, what)

        rng = random.Random(int(os.environ.get("VLFLOW_TRIAL_SEED", "1234")))
        interrupted = 0
        for trial in range(20):
            killed = trials.run_kill_trial(project, kill_after=rng.uniform(0.2, 0.9 * full_run), finish=False) is None
            interrupted += killed
            store = _check_committed(project, expected, trial)
            if not killed:  # the workflow completed: start over so that the next kills hit stages mid-run again
                store.gc(keep=set())
        assert interrupted >= 10, "too few trials were interrupted mid-run to mean anything"
        assert trials.run_kill_trial(project, kill_after=None) == expected
