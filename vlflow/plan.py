"""What a run would do and why: DAG selection, cache keys, run-or-cached per stage, why a stage reruns.

Reads the workflow model and the store (manifests, refs); executes nothing. The runner schedules from these plans,
`vlflow plan/status/metrics/gc` show them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vlflow import dag  # not networkx: its import cost a third of a no-op run
from vlflow.code_digest import CodeDigest
from vlflow.environment import current_environment, environment_changes
from vlflow.errors import VlflowError
from vlflow.file_digest import MEMO_FILE, FileDigests, local_path
from vlflow.matrix import expand_selection, storage_name
from vlflow.refs import referenced_stages
from vlflow.secrets import MASK, Masker, mask_credentials
from vlflow.stage import StageSpec, get_spec, local_file_params
from vlflow.store import ArtifactStore, Manifest
from vlflow.workflow import StageDecl, Workflow

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


def _file_changes(old: dict, files: dict) -> list[str]:
    """`param backbone_weights: contents of w/r101.pth changed`, for each local-file param whose value is the same
    as the last run's but whose contents are not (a changed value is reported as a param change)."""
    before = old.get("files")
    changes = []
    for name in sorted(set(before or {}) | set(files)):
        was, now = (before or {}).get(name), files.get(name)
        if was is not None and now is not None:
            if was["path"] == now["path"] and was["digest"] != now["digest"]:
                changes.append(f"param {name}: contents of {now['path']} changed")
        elif now is not None and old.get("params", {}) and _param_unchanged(old, name, now["path"]):
            changes.append(f"param {name}: contents of {now['path']} now part of the key (not a local path at the "
                           "last run" + (", or that run predates file-content keys)" if before is None else ")"))
        elif was is not None and now is None and _param_unchanged(old, name, was["path"]):
            changes.append(f"param {name}: {was['path']} no longer exists locally (keyed by its name)")
    return changes


def _param_unchanged(old: dict, name: str, value: str) -> bool:
    """Whether the last run's params held `value` at `name` (`backbone_weights`, `files[0].url`)."""
    node = old.get("params", {})
    for part in name.replace("[", ".[").split("."):
        if part.startswith("["):
            index = int(part[1:-1])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node == value


def damage_message(manifest: Manifest, stage: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"artifact {manifest.key[:12]} of stage {stage} is damaged: {problems[0]}{more}"


def mask_secrets(value, masker: Masker):
    """A copy of a JSON-like value fit to be written to the cache: URL passwords, credential-named keys and the
    workflow's secret values masked (`***`)."""
    value = mask_credentials(value)
    if isinstance(value, dict):
        return {k: mask_secrets(v, masker) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, masker) for v in value]
    if isinstance(value, str):
        return masker.mask(value)
    if value is not None and not isinstance(value, bool) and masker.contains(str(value)):
        return MASK  # e.g. a numeric secret a param coerced to an int
    return value


def ref_name(workflow: str, stage: str) -> str:
    """The store ref that records the last committed run of `stage` in `workflow` (what `why` compares against)."""
    return f"runs/{workflow}/{storage_name(stage)}"  # sweep entries hold '@', '=', ','


def stage_refs(decl: StageDecl) -> set[str]:
    """The stages whose output `decl`'s params reference (`${stages.S.output}`): data dependencies beyond inputs."""
    return referenced_stages(decl.params) & decl.deps()


def data_deps(decl: StageDecl) -> set[str]:
    return {ref.stage for ref in decl.inputs.values()} | stage_refs(decl)


class Planner:
    """Plans the stages of one workflow against one store."""

    def __init__(self, workflow: Workflow, store: ArtifactStore, rerun_on_env_change: bool = False,
                 check_artifacts: bool = True, state_dir: Path | None = None):
        self.workflow = workflow
        self.store = store
        self.graph = build_graph(workflow)
        self.rerun_on_env_change = rerun_on_env_change  # else a changed environment is only a warning
        self.check_artifacts = check_artifacts  # cheap size check of each cached artifact before trusting it
        # digests of the local files that params name, memoised across runs (a no-op run re-reads none of them)
        self.file_digests = FileDigests(Path(state_dir) / MEMO_FILE if state_dir is not None else None)

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
            "stage_refs": {s: content_digest(artifacts[s]) for s in sorted(stage_refs(decl))},
            **({"files": files} if (files := self.local_files(decl)) else {}),  # absent: keys as before files counted
        }

    def local_files(self, decl: StageDecl) -> dict[str, dict[str, str]]:
        """param name -> {path: its value, digest: of the contents}, for every `LocalFileParam` param naming an
        existing local file or directory. A hub name, another URL, a missing path (the stage's validation reports it)
        or a `${stages.S.output}` path (keyed by that artifact's digest) is keyed by its string in `params` alone."""
        files = {}
        for name, value in local_file_params(get_spec(decl.uses).params, decl.params):
            if referenced_stages(value) or (path := local_path(value)) is None:
                continue
            files[name] = {"path": value, "digest": self.file_digests.digest(path, f"stages.{decl.name}.with.{name}")}
        return files

    def plan_stage(self, name: str, artifacts: dict[str, Manifest], forced: set[str],
                   check: bool | None = None) -> StagePlan:
        """Run or cached, and why. `check` (default: `check_artifacts`) stats a cached artifact's files first; `run`
        passes False and checks an artifact only before a stage consumes it, so a no-op run reads manifests only."""
        check = self.check_artifacts if check is None else check
        decl = self.workflow.stages[name]
        plan = StagePlan(name=name, decl=decl, spec=get_spec(decl.uses))
        missing = sorted(d for d in data_deps(decl) if d not in artifacts)
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
        last = self.store.get_ref(ref_name(self.workflow.name, name))
        if last is None:
            return ["never run in this cache"]
        old = last.get("components", {})
        # the cache records components with secrets masked (mask_secrets): compare like with like
        components = {**components, "params": mask_secrets(components["params"], self.workflow.masker())}
        reasons = []
        if old.get("uses") != components["uses"]:
            reasons.append(f"stage type changed: {old.get('uses')} -> {components['uses']}")
        if old.get("code") != components["code"]:
            current = self._code(get_spec(components["uses"])).files
            reasons += _code_changes(components["uses"], last.get("code_files"), current)
        reasons += [f"param {d}" for d in _diff(old.get("params", {}), components["params"], "")]
        reasons += _file_changes(old, mask_secrets(components.get("files", {}), self.workflow.masker()))
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
        if not reasons and MASK in json.dumps(components["params"]):
            return ["a secret param may have changed (secrets are not recorded), or the artifact was removed"]
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
                    missing = [d for d in data_deps(plan.decl) if d not in artifacts]
                    raise VlflowError(f"--only {plan.name}: input stage(s) {', '.join(sorted(missing))} not in the "
                                      "cache; run them first (e.g. --until " + plan.name + ")")
            if plans[i].action in ("cached", "damaged"):
                artifacts[plan.name] = plans[i].manifest
