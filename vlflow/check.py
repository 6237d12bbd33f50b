"""`vlflow check`: rerun cached stages into scratch dirs and compare their data with the cached artifacts.

A stage's data (every file of its artifact but `_vlflow/`, the run's log, metrics and timings) should be a pure
function of its cache key; otherwise two caches hold different bytes under one key and everything downstream of it
moves. The check reruns each cached stage through the runner's own execution path (`Runner.produce`: the same inputs
materialised from the cache, the same local or distributed launch) into a staging dir of its own, with a scratch work
dir for resumable stages, and compares file by file. Nothing is committed, no ref is written and no lock is taken:
the cache is only read, so a `vlflow run` may use it meanwhile.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable

from vlflow.errors import VlflowError
from vlflow.executors.staging import claim_staging
from vlflow.matrix import expand_selection
from vlflow.plan import StagePlan
from vlflow.runner import Runner
from vlflow.store import META_DIR, FileEntry


class Verdict(str, Enum):
    REPRODUCED = "reproduced"
    DIFFERS = "differs"
    FAILED = "failed"  # the rerun itself failed
    NOT_CACHED = "not cached"


@dataclass(frozen=True)
class FileDifference:
    path: str
    cached: FileEntry | None  # None: the rerun wrote a file the cached artifact lacks
    rerun: FileEntry | None  # None: the rerun did not write this file

    def describe(self) -> str:
        if self.rerun is None:
            return f"{self.path}: in the cache ({_entry(self.cached)}), not written by the rerun"
        if self.cached is None:
            return f"{self.path}: written by the rerun ({_entry(self.rerun)}), not in the cache"
        return f"{self.path}: cached {_entry(self.cached)}, rerun {_entry(self.rerun)}"


@dataclass
class CheckResult:
    stage: str
    verdict: Verdict
    key: str | None = None
    differences: list[FileDifference] = field(default_factory=list)
    files: int = 0  # data files compared
    detail: str = ""  # why not cached, the failure, or where the differing rerun output was kept
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict in (Verdict.REPRODUCED, Verdict.NOT_CACHED)


def _entry(entry: FileEntry) -> str:
    return f"{entry.size} B, sha256 {entry.sha256[:12]}"


def data_entries(root: Path) -> list[FileEntry]:
    """(path, size, sha256) of every file under `root` but the top-level `_vlflow/`, sorted by path."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel.startswith(META_DIR + "/"):
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            entries.append(FileEntry(rel, path.stat().st_size, digest))
    return sorted(entries, key=lambda e: e.path)


def compare(cached: Iterable[FileEntry], rerun: Iterable[FileEntry]) -> list[FileDifference]:
    """The differing files, in path order (the first is the one to look at); `_vlflow/` is left out."""
    cached_by_path = {e.path: e for e in cached if not e.path.startswith(META_DIR + "/")}
    rerun_by_path = {e.path: e for e in rerun if not e.path.startswith(META_DIR + "/")}
    differences = []
    for path in sorted(set(cached_by_path) | set(rerun_by_path)):
        before, after = cached_by_path.get(path), rerun_by_path.get(path)
        if before is None or after is None or (before.size, before.sha256) != (after.size, after.sha256):
            differences.append(FileDifference(path, before, after))
    return differences


def check_stages(runner: Runner, stages: Iterable[str] = (),
                 on_start: Callable[[str], None] | None = None,
                 on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Rerun the named cached stages (all stages of the workflow when none are named), in DAG order, each against
    its cached inputs, and compare each rerun's data files with the cached artifact's.

    A rerun that differs is kept in `<state dir>/check/<workflow>/<stage>` (replacing an earlier one) to diff by
    hand; the others are removed."""
    stages = expand_selection(list(stages), runner.workflow.stages)  # a sweep's name: all its entries
    plans = runner.plan(until=stages)  # the named stages and their upstreams, or all
    # a damaged artifact (files missing) still has its manifest: its file list to compare, its key for downstream
    committed = ("cached", "damaged")
    artifacts = {p.name: p.manifest for p in plans if p.action in committed}
    results = []
    for plan in plans:
        if stages and plan.name not in stages:
            continue
        if plan.action not in committed:
            detail = "an upstream stage is not cached" if plan.key is None else "; ".join(plan.reasons)
            result = CheckResult(plan.name, Verdict.NOT_CACHED, plan.key, detail=detail or "not in the cache")
        else:
            if on_start is not None:
                on_start(plan.name)
            result = _check_one(runner, plan, artifacts)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _check_one(runner: Runner, plan: StagePlan, artifacts: dict) -> CheckResult:
    run_id = f"check-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    staging = runner.state_dir / "staging" / f"{plan.name}-{run_id}"
    owner = claim_staging(staging)  # a killed check's staging dir is swept by the next run, like a killed stage's
    started = time.time()
    try:
        work_dir = None
        if plan.spec.resumable:  # a scratch work dir: never resume from (or remove) a real run's checkpoints
            work_dir = staging / "work"
            work_dir.mkdir()
        try:
            produced = runner.produce(plan, artifacts, staging, run_id, work_dir)
        except VlflowError as exc:
            return CheckResult(plan.name, Verdict.FAILED, plan.key, detail=str(exc), seconds=time.time() - started)
        rerun = data_entries(produced.output_dir)
        differences = compare(plan.manifest.files, rerun)
        result = CheckResult(plan.name, Verdict.DIFFERS if differences else Verdict.REPRODUCED, plan.key,
                             differences, files=len(rerun), seconds=time.time() - started)
        if differences:
            kept = runner.state_dir / "check" / runner.workflow.name / plan.name
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(produced.output_dir, kept)
            result.detail = f"rerun output kept in {kept}"
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(owner)
