"""Plans and runs a workflow: DAG selection, cache keys, why-reruns, execution and commit.

The runner is the only part that knows the workflow model, the store and the launcher at once. Stages run in child
processes (`vlflow.execute` or the distributed launcher); their output directory is committed to the store only when
they succeed, so a failure or kill never leaves a committed partial artifact.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from vlflow import dag  # not networkx: its import cost a third of a no-op run
from vlflow.code_digest import CodeDigest
from vlflow.environment import current_environment, environment_changes
from vlflow.errors import StageError, VlflowError
from vlflow.matrix import expand_selection, storage_name
from vlflow.stage import StageSpec, get_spec, spec_source
from vlflow.store import META_DIR, ArtifactStore, Manifest  # META_DIR: stage.log, metrics.json of a run
from vlflow.workflow import StageDecl, Workflow

STAGE_REF = "${stages.%s.output}"
# Launch fields that change what a stage computes (and so its cache key); where it runs (nodes, addresses) does not.
RESULT_LAUNCH_FIELDS = ("plugin", "precision", "tp_size", "pp_size", "zero_stage")
STAGING_OWNER = ".owner.lock"  # flock-ed by the run that stages there, released by the OS when it dies
STAGING_GRACE_S = 10.0  # a dot-named staging dir this young is being claimed (mkdir, flock, rename)


def build_graph(workflow: Workflow) -> dag.DiGraph:
    graph = dag.DiGraph()
    for name, decl in workflow.stages.items():
        graph.add_node(name)
        for dep in decl.deps():
            graph.add_edge(dep, name)
    return graph


def select_stages(graph: dag.DiGraph, until: Iterable[str] = (), only: Iterable[str] = ()) -> list[str]:
    """Stages to consider, in a deterministic topological order."""
    until, only = expand_selection(until, graph.nodes), expand_selection(only, graph.nodes)  # a sweep: all entries
    for name in until + only:
        if name not in graph:
            raise VlflowError(f"no stage named {name!r} (stages: {', '.join(graph.nodes)})")
    if only:
        chosen = set(only)
    elif until:
        chosen = set(until)
        for name in until:
            chosen |= dag.ancestors(graph, name)
    else:
        chosen = set(graph.nodes)
    return [n for n in dag.lexicographical_topological_sort(graph) if n in chosen]


def forced_stages(graph: dag.DiGraph, force: Iterable[str]) -> set[str]:
    forced: set[str] = set()
    for name in expand_selection(force, graph.nodes):
        if name not in graph:
            raise VlflowError(f"--force: no stage named {name!r}")
        forced |= {name} | dag.descendants(graph, name)
    return forced


@dataclass
class StagePlan:
    name: str
    decl: StageDecl
    spec: StageSpec
    action: str = "run"  # "run", "cached", or "damaged" (plan only: the cheap check found its files changed)
    key: str | None = None  # None while an upstream has still to run
    reasons: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    components: dict | None = None
    code_files: dict[str, str] | None = None  # display path -> sha256 of each source file the stage runs
    warnings: list[str] = field(default_factory=list)  # e.g. a cached artifact made under other package versions
    damaged: list[str] = field(default_factory=list)  # what is wrong with the files of `manifest` (it is rebuilt)
    forced: bool = False  # --force: execute even when the key is committed
    ran: bool = False  # executed by this run (False when cached, also when another stage of this run made its key)


def content_digest(manifest: Manifest) -> str:
    """Digest of an artifact's data files, leaving out the run's own log and metrics (`_vlflow/`), so a rerun that
    produces the same data does not invalidate everything downstream. Kept in the small manifest: nothing is read."""
    return manifest.data_digest


def flatten_metrics(metrics: dict, prefix: str = ""):
    """(key, value) pairs of a stage's returned metrics, nested keys joined by dots (`all.ir_r1`)."""
    for k, v in metrics.items():
        if isinstance(v, dict):
            yield from flatten_metrics(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def summarize_metrics(metrics: dict, limit: int = 10) -> str:
    """`a=1 b.c=0.404 ...`: the first `limit` numbers of a stage's returned metrics."""
    flat = [f"{k}={v:.4g}" for k, v in flatten_metrics(metrics)
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(flat[:limit]) + (" …" if len(flat) > limit else "")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _diff(old, new, prefix: str) -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path} added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{path} removed (was {_short(old[k])})")
            else:
                out += _diff(old[k], new[k], path)
        return out
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def _short(value) -> str:
    from vlflow.secrets import mask

    text = mask(json.dumps(value, default=str))  # before truncating: a cut URL no longer looks like one
    return text if len(text) <= 60 else text[:57] + "..."


def _code_changes(uses: str, old: dict | None, new: dict) -> list[str]:
    """`code: stages/common/training.py changed`, one line per source file that differs from the last run's."""
    if not isinstance(old, dict):  # a run recorded before per-file digests
        return [f"code of {uses} changed"]
    changes = []
    for path in sorted(set(old) | set(new)):
        if path not in old:
            changes.append(f"code: {path} is now run")
        elif path not in new:
            changes.append(f"code: {path} is no longer run")
        elif old[path] != new[path]:
            changes.append(f"code: {path} changed")
    return changes or [f"code of {uses} changed (its spec version or name)"]


@dataclass
class Produced:
    """What one execution of a stage left in its staging dir, before any commit."""
    output_dir: Path
    log_path: Path
    metrics: dict | None
    started: float
    duration: float


def damage_message(manifest: Manifest, stage: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"artifact {manifest.key[:12]} of stage {stage} is damaged: {problems[0]}{more}"


def claim_staging(staging: Path) -> int:
    """Create the staging dir of one stage execution, holding its owner lock; returns the fd to close when done.

    The dir is made under a dot-name and renamed once the lock is held, so a sweep never sees it unowned."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    claiming = staging.with_name("." + staging.name)
    claiming.mkdir()
    fd = os.open(claiming / STAGING_OWNER, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(claiming, staging)
    return fd


def sweep_stale_staging(state_dir: Path) -> list[Path]:
    """Remove the staging dirs of stage executions whose run is gone (killed: its partial output stays there).

    A live run, of any workflow or cache sharing this state dir, holds the owner lock of each of its staging dirs."""
    removed = []
    root = Path(state_dir) / "staging"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < STAGING_GRACE_S:
                continue  # being claimed right now
            fd = os.open(entry / STAGING_OWNER, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:  # vanished meanwhile (its run finished)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run's
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


class Runner:
    def __init__(self, workflow: Workflow, store: ArtifactStore, state_dir: Path, jobs: int = 1,
                 on_event: Callable[[str, str, str], None] | None = None, python: str = sys.executable,
                 rerun_on_env_change: bool = False, check_artifacts: bool = True):
        self.workflow = workflow
        self.store = store
        self.state_dir = Path(state_dir)
        self.jobs = max(1, jobs)
        self.graph = build_graph(workflow)
        self.on_event = on_event or (lambda stage, kind, text: None)
        self.python = python
        self.rerun_on_env_change = rerun_on_env_change  # else a changed environment is only a warning
        self.check_artifacts = check_artifacts  # cheap size check of each cached artifact before trusting it

    # ---- planning -------------------------------------------------------------------------------------------
    @staticmethod
    def _code(spec: StageSpec) -> CodeDigest:
        return spec.code()  # cached per process (vlflow.code_digest)

    def key_components(self, decl: StageDecl, artifacts: dict[str, Manifest]) -> dict:
        spec = get_spec(decl.uses)
        launch = decl.launch.model_dump() if decl.launch else {}
        return {
            "uses": decl.uses,
            "code": self._code(spec).digest,
            "params": decl.params,
            "launch": {k: launch[k] for k in RESULT_LAUNCH_FIELDS if k in launch},
            "inputs": {name: {"digest": content_digest(artifacts[ref.stage]), "subpath": ref.subpath}
                       for name, ref in sorted(decl.inputs.items())},
            "stage_refs": {s: content_digest(artifacts[s]) for s in sorted(self._stage_refs(decl))},
        }

    @staticmethod
    def _stage_refs(decl: StageDecl) -> set[str]:
        text = json.dumps(decl.params)
        return {s for s in decl.deps() if STAGE_REF % s in text}

    def _ref_name(self, stage: str) -> str:
        return f"runs/{self.workflow.name}/{storage_name(stage)}"  # sweep entries hold '@', '=', ','

    def _data_deps(self, decl: StageDecl) -> set[str]:
        return {ref.stage for ref in decl.inputs.values()} | self._stage_refs(decl)

    def plan_stage(self, name: str, artifacts: dict[str, Manifest], forced: set[str],
                   check: bool | None = None) -> StagePlan:
        """Run or cached, and why. `check` (default: `check_artifacts`) stats a cached artifact's files first; `run`
        passes False and checks an artifact only before a stage consumes it, so a no-op run reads manifests only."""
        check = self.check_artifacts if check is None else check
        decl = self.workflow.stages[name]
        plan = StagePlan(name=name, decl=decl, spec=get_spec(decl.uses))
        missing = sorted(d for d in self._data_deps(decl) if d not in artifacts)
        if missing:
            plan.reasons.append(f"upstream {', '.join(missing)} will run first")
            return plan
        plan.components = self.key_components(decl, artifacts)
        plan.key = _digest(plan.components)
        plan.code_files = self._code(plan.spec).files
        plan.manifest = self.store.manifest(plan.key)
        changes = environment_changes((plan.manifest.meta if plan.manifest else {}).get("environment"),
                                      current_environment())
        if plan.manifest is not None and check and name not in forced:
            plan.damaged = self.store.damage(plan.manifest)
        if name in forced:
            plan.forced = True
            plan.reasons.append("forced")
        elif plan.damaged:  # its key still holds for what is downstream
            plan.action = "damaged"
            plan.reasons.append(damage_message(plan.manifest, name, plan.damaged)
                                + "; vlflow run rebuilds it before a stage uses it")
        elif changes and self.rerun_on_env_change:
            plan.reasons.append(f"environment changed: {', '.join(changes)}")
        elif plan.manifest is not None:
            plan.action = "cached"
            if changes:
                plan.warnings.append(f"made under another environment: {', '.join(changes)}")
        else:
            plan.reasons.extend(self.why(name, plan.components))
        return plan

    def why(self, name: str, components: dict) -> list[str]:
        """Explain a cache miss against the last committed run of this stage in this workflow."""
        last = self.store.get_ref(self._ref_name(name))
        if last is None:
            return ["never run in this cache"]
        old = last.get("components", {})
        reasons = []
        if old.get("uses") != components["uses"]:
            reasons.append(f"stage type changed: {old.get('uses')} -> {components['uses']}")
        if old.get("code") != components["code"]:
            current = self._code(get_spec(components["uses"])).files
            reasons += _code_changes(components["uses"], last.get("code_files"), current)
        reasons += [f"param {d}" for d in _diff(old.get("params", {}), components["params"], "")]
        reasons += [f"launch {d}" for d in _diff(old.get("launch", {}), components["launch"], "")]
        for input_name in sorted(set(old.get("inputs", {})) | set(components["inputs"])):
            before, after = old.get("inputs", {}).get(input_name), components["inputs"].get(input_name)
            if before is None or after is None:
                reasons.append(f"input {input_name} {'added' if before is None else 'removed'}")
            elif before["subpath"] != after["subpath"]:
                reasons.append(f"input {input_name} path changed: {before['subpath']!r} -> {after['subpath']!r}")
            elif before["digest"] != after["digest"]:
                reasons.append(f"input {input_name} changed (upstream artifact differs)")
        if old.get("stage_refs") != components["stage_refs"]:
            reasons.append("a referenced stage output changed")
        return reasons or ["artifact missing from cache (removed or never committed)"]

    def plan(self, until: Iterable[str] = (), only: Iterable[str] = (), force: Iterable[str] = ()) -> list[StagePlan]:
        selected = select_stages(self.graph, until, only)
        forced = forced_stages(self.graph, force)
        artifacts: dict[str, Manifest] = {}
        plans = []
        # Each key depends on the manifests upstream, so they are asked for one by one; on an object store the
        # store reads the ones this workflow's last plan asked for all at once first (one request per stage).
        with self.store.read_ahead(f"plan/{self.workflow.name}"):
            for name in selected:
                plan = self.plan_stage(name, artifacts, forced)
                if plan.action in ("cached", "damaged"):
                    artifacts[name] = plan.manifest
                plans.append(plan)
        if only:  # --only runs just these stages: their inputs must already be in the cache
            self._add_cached_upstreams(plans, selected, artifacts, forced)
        return plans

    def _add_cached_upstreams(self, plans, selected, artifacts, forced) -> None:
        outside = [n for n in dag.lexicographical_topological_sort(self.graph) if n not in selected]
        for name in outside:
            plan = self.plan_stage(name, artifacts, set())
            if plan.action in ("cached", "damaged"):
                artifacts[name] = plan.manifest
        for i, plan in enumerate(plans):
            if plan.key is None:
                plans[i] = self.plan_stage(plan.name, artifacts, forced)
                if plans[i].key is None:
                    missing = [d for d in self._data_deps(plan.decl) if d not in artifacts]
                    raise VlflowError(f"--only {plan.name}: input stage(s) {', '.join(sorted(missing))} not in the "
                                      "cache; run them first (e.g. --until " + plan.name + ")")
            if plans[i].action in ("cached", "damaged"):
                artifacts[plan.name] = plans[i].manifest

    # ---- running --------------------------------------------------------------------------------------------
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
                    plan = self.plan_stage(name, artifacts, set(), check=False)
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
                    plan = self.plan_stage(name, artifacts, forced, check=False)
                    if plan.key is None:
                        missing = sorted(d for d in self._data_deps(plan.decl) if d not in artifacts)
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
                    running[pool.submit(self._execute, plan, artifacts)] = plan
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
        for dep in sorted(self._data_deps(plan.decl)):
            if dep in done and done[dep].ran:
                continue  # committed by this very run
            problems = self.store.damage(artifacts[dep])
            if problems:
                found[dep] = damage_message(artifacts[dep], dep, problems)
        return found

    def _ready(self, name: str, selected: list[str], done: dict) -> bool:
        return all(d not in selected or d in done for d in self.workflow.stages[name].deps())

    def _execute(self, plan: StagePlan, artifacts: dict[str, Manifest]) -> Manifest:
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
        meta = {
            "workflow": self.workflow.name, "stage": decl.name, "uses": decl.uses, "params": decl.params,
            "components": plan.components, "metrics": metrics or {}, "started": started, "duration": duration,
            "host": os.uname().nodename, "code_files": plan.code_files, "environment": current_environment(),
        }
        if lock is not None:
            lock.ensure_held()  # an object-store lease can run out while a stage runs: then another run owns the key
        manifest = self.store.commit(plan.key, output_dir, meta)
        self.store.put_ref(self._ref_name(decl.name), {"key": plan.key, "components": plan.components,
                                                        "code_files": plan.code_files, "committed": time.time()})
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
            base = self._materialize(artifacts[ref.stage])
            path = base / ref.subpath if ref.subpath else base
            if not path.exists():
                raise StageError(f"stage {decl.name}: input {input_name} = {ref.stage}/{ref.subpath} does not exist "
                                 f"in the artifact of {ref.stage}", file=decl.file, line=decl.line)
            inputs[input_name] = str(path)
        params = self._substitute_refs(decl.params, artifacts)
        payload = {
            "stage": decl.name, "uses": decl.uses, "params": params, "inputs": inputs,
            "output_dir": str(output_dir), "work_dir": str(work_dir) if work_dir else None,
            "launch": decl.launch.model_dump() if decl.launch else None, "log_level": "INFO",
            "spec_source": spec_source(decl.uses),  # the stage process imports this spec module only
        }
        payload_path = staging / "payload.json"
        payload_path.write_text(json.dumps(payload, indent=1))
        started = time.time()
        from vlflow.executors import StageJob, executor_for

        job = StageJob(decl, spec, payload_path, log_path, self.workflow.name,
                       on_line=lambda line: self.on_event(decl.name, "log", line),
                       on_note=lambda text: self.on_event(decl.name, "note", f"{decl.name}: {text}"),
                       state_dir=self.state_dir)
        metrics = executor_for(decl.executor, self._run_local, python=self.python).run(job)
        return Produced(output_dir, log_path, metrics, started, time.time() - started)

    def _materialize(self, manifest: Manifest) -> Path:
        if self.check_artifacts and self.store.is_local:  # a download is size-checked by the store itself
            problems = self.store.damage(manifest)
            if problems:  # changed since this run planned with it
                raise StageError(damage_message(manifest, manifest.meta.get("stage", "?"), problems)
                                 + "; the next vlflow run rebuilds it")
        return self.store.materialize(manifest.key, self.state_dir / "mirror" / manifest.digest)

    def _substitute_refs(self, params, artifacts: dict[str, Manifest]):
        text = json.dumps(params)
        for stage in self._stage_refs_in(text):
            local = self._materialize(artifacts[stage])
            text = text.replace(STAGE_REF % stage, json.dumps(str(local))[1:-1])
        return json.loads(text)

    def _stage_refs_in(self, text: str) -> list[str]:
        return [s for s in self.workflow.stages if STAGE_REF % s in text]

    def _run_local(self, decl: StageDecl, payload_path: Path, log_path: Path) -> dict | None:
        from vlflow.execute import result_path
        from vlflow.executors.forked import run_stage_process  # forked from a warm server, or a fresh interpreter

        rc = run_stage_process(payload_path, log_path, lambda line: self.on_event(decl.name, "log", line),
                               python=self.python)
        if rc != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            raise StageError(f"stage {decl.name} ({decl.uses}) failed with exit code {rc}; log: {log_path}\n{tail}",
                             file=decl.file, line=decl.line)
        result = result_path(payload_path)
        return json.loads(result.read_text()) if result.exists() else None
