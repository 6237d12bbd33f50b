"""Runs a workflow: schedules its ready stages onto executors, at most `jobs` at once, in a deterministic order.

Planning (keys, run-or-cached and why) is vlflow.plan's; executing and committing one stage is
vlflow.executors.execution's; where its process runs is the executor's (vlflow.executors). Stages run in child
processes, so a failure or kill never leaves a committed partial artifact.
"""
from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable

from vlflow import dag  # not networkx: its import cost a third of a no-op run
from vlflow.errors import VlflowError
from vlflow.executors.execution import Produced, StageExecution
from vlflow.executors.staging import sweep_stale_staging
from vlflow.plan import Planner, StagePlan, damage_message, data_deps, forced_stages, select_stages, summarize_metrics
from vlflow.store import ArtifactStore, Manifest
from vlflow.workflow import Workflow


class Runner:
    def __init__(self, workflow: Workflow, store: ArtifactStore, state_dir: Path, jobs: int = 1,
                 on_event: Callable[[str, str, str], None] | None = None, python: str = sys.executable,
                 rerun_on_env_change: bool = False, check_artifacts: bool = True):
        self.workflow = workflow
        self.store = store
        self.state_dir = Path(state_dir)
        self.jobs = max(1, jobs)
        self.on_event = on_event or (lambda stage, kind, text: None)
        self.check_artifacts = check_artifacts  # cheap size check of each cached artifact before trusting it
        self.planner = Planner(workflow, store, rerun_on_env_change=rerun_on_env_change,
                               check_artifacts=check_artifacts, state_dir=self.state_dir)
        self.graph = self.planner.graph
        self.execution = StageExecution(workflow, store, self.state_dir, self.on_event, python=python,
                                        check_artifacts=check_artifacts)

    def plan(self, until: Iterable[str] = (), only: Iterable[str] = (), force: Iterable[str] = ()) -> list[StagePlan]:
        """What `run` would do with these selectors, and why (executes nothing)."""
        return self.planner.plan(until, only, force)

    def produce(self, plan: StagePlan, artifacts: dict[str, Manifest], staging: Path, run_id: str,
                work_dir: Path | None) -> Produced:
        """Run one stage into `staging/output` without committing it (`vlflow check` reruns cached stages so)."""
        return self.execution.produce(plan, artifacts, staging, run_id, work_dir)

    def _materialize(self, manifest: Manifest) -> Path:
        return self.execution.materialize(manifest)

    def run(self, until: Iterable[str] = (), only: Iterable[str] = (), force: Iterable[str] = ()) -> list[StagePlan]:
        """Run what is missing. Returns the plan entries of the selected stages (all committed); raises on failure.

        Independent stages run concurrently (up to `jobs`); after a failure no new stage starts, running ones finish.
        """
        # Stages are planned one by one (each key depends on the manifests upstream); on an object store the store
        # reads the manifests this workflow asked for last time all at once first (ArtifactStore.read_ahead).
        with self.store.read_ahead(f"plan/{self.workflow.name}"):
            return self._run(until, only, force)

    def _run(self, until: Iterable[str], only: Iterable[str], force: Iterable[str]) -> list[StagePlan]:
        selected = select_stages(self.graph, until, only)
        forced = forced_stages(self.graph, force)
        from vlflow.executors.slurm import check_can_submit

        check_can_submit([self.workflow.stages[n] for n in selected if self.workflow.stages[n].executor.is_slurm],
                         self.store.url, self.store.is_local, self.state_dir)
        swept = sweep_stale_staging(self.state_dir)
        if swept:
            self.on_event("", "note", f"removed {len(swept)} staging dir(s) left by killed runs")
        artifacts: dict[str, Manifest] = {}
        if only:  # upstream stages outside the selection must already be cached
            for name in dag.lexicographical_topological_sort(self.graph):
                if name not in selected:
                    plan = self.planner.plan_stage(name, artifacts, set(), check=False)
                    if plan.action == "cached":
                        artifacts[name] = plan.manifest
        done: dict[str, StagePlan] = {}
        rebuild: dict[str, str] = {}  # cached stages found damaged when a stage was about to consume them -> why
        pending = list(selected)
        running: dict[Future, StagePlan] = {}
        failure: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            while True:
                requeued = False
                for name in list(pending) if failure is None else []:
                    if len(running) >= self.jobs:
                        break
                    if not self._ready(name, selected, done):
                        continue
                    plan = self.planner.plan_stage(name, artifacts, forced, check=False)
                    if plan.key is None:
                        missing = sorted(d for d in data_deps(plan.decl) if d not in artifacts)
                        raise VlflowError(f"stage {name}: input stage(s) {', '.join(missing)} not in the cache; "
                                          f"run them first (e.g. --until {name})")
                    if name in rebuild and plan.action == "cached":
                        plan.action, plan.reasons = "run", [rebuild[name]]
                    if plan.action == "run" and self.check_artifacts:
                        damaged = self._damaged_inputs(plan, artifacts, done)
                        for dep, message in damaged.items():
                            if dep not in selected:
                                raise VlflowError(f"{message}; it is outside this run's selection (--only): rerun "
                                                  f"without --only, or with --only {dep} first, to rebuild it")
                            self.on_event(dep, "damaged", message)
                            rebuild[dep] = f"{message}; rebuilding it"
                            del artifacts[dep], done[dep]
                        if damaged:  # rebuild them first; this stage waits for them (see _ready)
                            pending = [n for n in selected if n in pending or n in damaged]
                            requeued = True
                            break
                    if plan.action == "run" and any(p.key == plan.key for p in running.values()):
                        continue  # another stage of this run is making this very artifact: use it when committed
                    pending.remove(name)
                    if plan.action == "cached":
                        self.on_event(name, "cached", plan.key[:12])
                        for warning in plan.warnings:
                            self.on_event(name, "warning", warning)
                        artifacts[name] = plan.manifest
                        done[name] = plan
                        continue
                    self.on_event(name, "start", "; ".join(plan.reasons))
                    running[pool.submit(self.execution.execute, plan, artifacts)] = plan
                if requeued:
                    continue
                if not running:
                    break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    plan = running.pop(future)
                    try:
                        plan.manifest = future.result()
                    except BaseException as exc:  # keep the first failure; let running stages finish
                        failure = failure or exc
                        self.on_event(plan.name, "failed", str(exc))
                        continue
                    plan.action = "cached"
                    artifacts[plan.name] = plan.manifest
                    done[plan.name] = plan
                    if not plan.ran:
                        self.on_event(plan.name, "cached", f"{plan.key[:12]} (committed meanwhile by another run)")
                        continue
                    self.on_event(plan.name, "done", f"{plan.manifest.meta.get('duration', 0):.1f}s")
                    summary = summarize_metrics(plan.manifest.meta.get("metrics") or {})
                    if summary:
                        self.on_event(plan.name, "metrics", summary)
        except BaseException:
            # Ctrl-C / SIGTERM: do not wait for running stages; the CLI exits and they die with the process
            pool.shutdown(wait=False, cancel_futures=True)
            from vlflow.executors.slurm import cancel_submitted_jobs

            cancel_submitted_jobs()  # batch jobs do not die with this process
            raise
        pool.shutdown()
        if failure is not None:
            raise failure
        return [done[n] for n in selected]

    def _damaged_inputs(self, plan: StagePlan, artifacts: dict[str, Manifest], done: dict[str, StagePlan]) -> dict:
        """{upstream stage: message} for the cached artifacts this stage would consume whose files are damaged."""
        found = {}
        for dep in sorted(data_deps(plan.decl)):
            if dep in done and done[dep].ran:
                continue  # committed by this very run
            problems = self.store.damage(artifacts[dep])
            if problems:
                found[dep] = damage_message(artifacts[dep], dep, problems)
        return found

    def _ready(self, name: str, selected: list[str], done: dict) -> bool:
        return all(d not in selected or d in done for d in self.workflow.stages[name].deps())
