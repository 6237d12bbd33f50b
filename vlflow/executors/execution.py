"""One execution of one stage, wherever its process runs: under the cache's lock on its key, in a claimed staging dir,
inputs materialised, the payload written, the executor run, the output committed (manifest last) and the ref updated.

A failure or kill never leaves a committed partial artifact: the staging dir is committed only when the stage succeeded
(a killed run's is swept by the next, vlflow.executors.staging).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlflow.environment import current_environment
from vlflow.errors import StageError
from vlflow.executors import StageJob, executor_for
from vlflow.executors.staging import claim_staging
from vlflow.launch.command import secrets_reach_every_rank
from vlflow.payload import PayloadPipe, StagePayload
from vlflow.plan import StagePlan, damage_message, mask_secrets, ref_name
from vlflow.refs import substitute_stage_outputs
from vlflow.stage import LaunchSpec, spec_source
from vlflow.store import META_DIR, ArtifactStore, Manifest  # META_DIR: stage.log, metrics.json of a run
from vlflow.workflow import Workflow


@dataclass
class Produced:
    """What one execution of a stage left in its staging dir, before any commit."""
    output_dir: Path
    log_path: Path
    metrics: dict | None
    started: float
    duration: float


class StageExecution:
    """Executes and commits the stages of one workflow into one store (the runner's threads share one)."""

    def __init__(self, workflow: Workflow, store: ArtifactStore, state_dir: Path,
                 on_event: Callable[[str, str, str], None], python: str = sys.executable,
                 check_artifacts: bool = True):
        self.workflow = workflow
        self.store = store
        self.state_dir = Path(state_dir)
        self.on_event = on_event
        self.python = python
        self.check_artifacts = check_artifacts

    def execute(self, plan: StagePlan, artifacts: dict[str, Manifest]) -> Manifest:
        """Execute and commit one stage under the cache's lock on its key, so that no two runs (whatever their state
        dirs or spelling of the cache URL) execute or commit one key at once. Under the lock the manifest is read
        again: what another run committed meanwhile is used as is (`plan.ran` stays False)."""
        label = f"artifact {plan.key[:12]} (stage {plan.name}) in {self.store.url}"
        with self.store.lock(f"keys/{plan.key}", label=label,
                             on_wait=lambda message: self.on_event(plan.name, "note", message)) as lock:
            current = self.store.manifest(plan.key)
            if current is not None and not plan.forced and (
                    plan.manifest is None or current.attempt != plan.manifest.attempt):
                return current
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            staging = self.state_dir / "staging" / f"{plan.name}-{run_id}"
            owner = claim_staging(staging)
            try:
                manifest = self._execute_in(plan, artifacts, staging, run_id, lock=lock)
            finally:
                os.close(owner)  # a failed execution's staging dir is swept by the next run
            plan.ran = True
            return manifest

    def _execute_in(self, plan: StagePlan, artifacts: dict[str, Manifest], staging: Path, run_id: str,
                    lock=None) -> Manifest:
        decl = plan.decl
        work_dir = None
        if plan.spec.resumable:
            work_dir = self.state_dir / "work" / plan.key
            work_dir.mkdir(parents=True, exist_ok=True)
        produced = self.produce(plan, artifacts, staging, run_id, work_dir)
        output_dir, log_path, metrics = produced.output_dir, produced.log_path, produced.metrics
        started, duration = produced.started, produced.duration
        meta_dir = output_dir / META_DIR
        meta_dir.mkdir(exist_ok=True)
        shutil.copyfile(log_path, meta_dir / "stage.log")
        (meta_dir / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, default=float))
        # The cache keeps what a key was made of with secrets masked (the key itself is a digest of the clear values).
        masker = self.workflow.masker()
        params, components = mask_secrets(decl.params, masker), mask_secrets(plan.components, masker)
        meta = {
            "workflow": self.workflow.name, "stage": decl.name, "uses": decl.uses, "params": params,
            "components": components, "metrics": metrics or {}, "started": started, "duration": duration,
            "host": os.uname().nodename, "code_files": plan.code_files, "environment": current_environment(),
        }
        if lock is not None:
            lock.ensure_held()  # an object-store lease can run out while a stage runs: then another run owns the key
        manifest = self.store.commit(plan.key, output_dir, meta)
        self.store.put_ref(ref_name(self.workflow.name, decl.name),
                           {"key": plan.key, "components": components, "code_files": plan.code_files,
                            "committed": time.time()})
        shutil.rmtree(staging, ignore_errors=True)
        if work_dir is not None:  # the artifact is committed: checkpoints are no longer needed to resume
            shutil.rmtree(work_dir, ignore_errors=True)
        return manifest

    def produce(self, plan: StagePlan, artifacts: dict[str, Manifest], staging: Path, run_id: str,
                work_dir: Path | None) -> "Produced":
        """Run one stage into `staging/output`, its inputs materialised from `artifacts`; nothing is committed.

        `vlflow check` (vlflow.check) reruns cached stages through this too, with a scratch work dir."""
        decl, spec = plan.decl, plan.spec
        output_dir = staging / "output"
        output_dir.mkdir(parents=True)
        logs_dir = self.state_dir / "logs" / self.workflow.name
        logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = logs_dir / f"{decl.name}-{run_id}.log"
        inputs = {}
        for input_name, ref in decl.inputs.items():
            base = self.materialize(artifacts[ref.stage])
            path = base / ref.subpath if ref.subpath else base
            if not path.exists():
                raise StageError(f"stage {decl.name}: input {input_name} = {ref.stage}/{ref.subpath} does not exist "
                                 f"in the artifact of {ref.stage}", file=decl.file, line=decl.line)
            inputs[input_name] = path
        params = substitute_stage_outputs(decl.params, lambda stage: str(self.materialize(artifacts[stage])))
        payload = StagePayload(
            stage=decl.name, uses=decl.uses, params=params, inputs=inputs, output_dir=output_dir, work_dir=work_dir,
            launch=decl.launch, spec_source=spec_source(decl.uses))  # the stage process imports this spec only
        payload_path, pipe, secrets = staging / "payload.json", None, None
        if decl.executor.is_slurm:  # read on another node, maybe more than once (resubmits): a 0600 file
            payload.write(payload_path)
        elif spec.distributed:  # read by the launcher and every rank: placeholders, the clear values in their env
            if secrets_reach_every_rank(decl.launch or LaunchSpec()):
                payload, secrets = payload.sealed(mask_secrets(payload.params, self.workflow.masker()))
            payload.write(payload_path)
        else:  # one local process reads it once: through a FIFO, so its secrets never reach the disk
            pipe = PayloadPipe(payload, payload_path)
        started = time.time()
        job = StageJob(decl, spec, payload_path, log_path, self.workflow.name,
                       on_line=lambda line: self.on_event(decl.name, "log", line),
                       on_note=lambda text: self.on_event(decl.name, "note", f"{decl.name}: {text}"),
                       state_dir=self.state_dir, payload_secrets=secrets)
        try:
            metrics = executor_for(decl.executor, python=self.python).run(job)
        finally:  # it may hold secrets: never left behind, whatever happened (a failed stage's staging dir stays)
            if pipe is not None:
                pipe.close()
            payload_path.unlink(missing_ok=True)
        return Produced(output_dir, log_path, metrics, started, time.time() - started)

    def materialize(self, manifest: Manifest) -> Path:
        if self.check_artifacts and self.store.is_local:  # a download is size-checked by the store itself
            problems = self.store.damage(manifest)
            if problems:  # changed since this run planned with it
                raise StageError(damage_message(manifest, manifest.meta.get("stage", "?"), problems)
                                 + "; the next vlflow run rebuilds it")
        return self.store.materialize(manifest.key, self.state_dir / "mirror" / manifest.digest)
