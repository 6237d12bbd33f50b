"""Loads a workflow file: include/extends, `--set`, interpolation, sweeps, validation against the stage specs.

Phases, each on plain data plus the location of every value (vlflow.workflow.yaml_lines):
1. parse each file (duplicate keys and non-string keys are errors), merge `extends` then `include`s under it,
2. apply `--set PATH=VALUE` overrides to the merged document,
3. resolve `${...}` references in `params`, then in each stage's `with`, `inputs`, `needs` and `launch`,
4. validate each stage against its `StageSpec` (pydantic params, declared inputs, launch settings),
5. check the dependency graph (dangling references, self-dependencies, cycles).
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pydantic

from vlflow import dag
from vlflow.errors import WorkflowError
from vlflow.executors.spec import ExecutorSpec
from vlflow.matrix import MATRIX_KEY, expand_matrices
from vlflow.refs import STAGE_REF_NAME, with_stage_outputs_as_paths
from vlflow.secrets import Masker, secret_env_values
from vlflow.stage import LaunchSpec, StageSpec, get_spec, registry
from vlflow.workflow.includes import TOP_LEVEL_KEYS, DocumentReader
from vlflow.workflow.interpolate import Resolver
from vlflow.workflow.messages import more_errors, pydantic_message, pydantic_problem, short_repr, suggest, type_name
from vlflow.workflow.model import InputRef, StageDecl, Workflow
from vlflow.workflow.overrides import apply_overrides
from vlflow.workflow.validate import bool_for_number, launch_conflict, model_parallel_conflict
from vlflow.workflow.yaml_lines import KeyPath, Location, Locations, dotted

STAGE_KEYS = ("uses", "with", "inputs", "needs", "launch", MATRIX_KEY, "executor")
DEFAULTS_KEYS = ("launch", "executor")
STAGE_NAME = re.compile(STAGE_REF_NAME)  # a sweep entry (`finetune@lr=0.1`) is a stage name too
WORKFLOW_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Bounds on what one workflow may make the loader do (with those of includes, yaml_lines, interpolate): far above
# any real workflow, far below a resource bomb.
MAX_NAME_LENGTH = 100  # workflow and stage names (they become file names and lock names)


def load_workflow(path, overrides: list[str] = (), launch_defaults: dict | None = None,
                  env: Mapping[str, str] | None = None, include_paths: list | tuple = (),
                  executor_defaults: dict | None = None) -> Workflow:
    """Load, merge, override, interpolate and validate a workflow file. Raises WorkflowError for any user error.

    `include:`/`extends:` may name files inside the workflow file's own directory tree, or inside one of
    `include_paths` (vlflow.toml's `[workflow] include_paths`)."""
    env = os.environ if env is None else env
    loader = _Loader(Path(path), list(overrides), dict(launch_defaults or {}), env,
                     [Path(p) for p in include_paths])
    loader.executor_defaults = dict(executor_defaults or {})  # vlflow.toml's [executor]
    try:
        return loader.load()
    except WorkflowError as exc:
        # Errors quote values; a value that came from a secret-looking variable must never be printed.
        masker = Masker(env=env).with_values(loader.used_secrets)
        message, field_name = masker.mask(exc.message), masker.mask(exc.field) if exc.field else exc.field
        if (message, field_name) == (exc.message, exc.field):
            raise
        raise WorkflowError(message, file=exc.file, line=exc.line, field=field_name) from None
    except RecursionError:  # a bound above was missed: still one clear error, never a traceback
        raise WorkflowError("the workflow nests too deeply to be read", file=str(path)) from None


class _Loader:
    def __init__(self, path: Path, overrides: list[str], launch_defaults: dict, env: Mapping[str, str],
                 include_paths: list[Path]):
        self.path = path
        self.overrides = overrides
        self.launch_defaults = launch_defaults
        self.env = env
        self.locations: Locations = {}
        # Where include/extends may read: the workflow's own directory tree, then the configured extra trees.
        self.reader = DocumentReader([path.resolve().parent, *(Path(p).resolve() for p in include_paths)])
        self.used_secrets: set[str] = set()  # values interpolated from secret-looking variables
        self.executor_defaults: dict = {}
        self.default_executor: dict = {}  # project [executor] <- workflow defaults.executor

    # -- errors ------------------------------------------------------------------------------------------------

    def where(self, path: KeyPath) -> Location:
        while path and path not in self.locations:
            path = path[:-1]
        return self.locations.get(path, Location(str(self.path), None))

    def fail(self, message: str, path: KeyPath, at: KeyPath | None = None) -> WorkflowError:
        """An error about `path`, located where `at` (default: `path` or its nearest located parent) was written."""
        file, line = self.where(path if at is None else at)
        return WorkflowError(message, file=file, line=line, field=dotted(path) or None)

    def expect(self, value: Any, kind: type, path: KeyPath, what: str) -> Any:
        """`value` if it is a `kind` (an empty block counts as an empty mapping/list), else an error."""
        if value is None and kind in (dict, list):
            return kind()
        if not isinstance(value, kind):
            got = type_name(value)
            if value is not None and not isinstance(value, (dict, list)):
                got += f" {short_repr(value)}"
            raise self.fail(f"expected {what}, got {got}", path)
        return value

    # -- phases ------------------------------------------------------------------------------------------------

    def load(self) -> Workflow:
        document, self.locations = self.reader.read_document(self.path, chain=[])
        name_given = "name" in document and self.locations.get(("name",), Location(None, None)).file == str(self.path)
        apply_overrides(document, self.overrides, self.locations)
        for key in ("include", "extends"):
            if key in document:
                raise self.fail(f"`{key}` cannot be changed with --set (files are merged before overrides)",
                                (key,))
        if not name_given and not any(o.split("=", 1)[0].strip() == "name" for o in self.overrides):
            document["name"] = self.path.stem  # an extending file is its own workflow, not its base's
        for key in document:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(f"unknown top-level key {key!r}{suggest(key, TOP_LEVEL_KEYS)}", (key,))
        name = self.expect(document.get("name"), str, ("name",), "a string")
        if not WORKFLOW_NAME.fullmatch(name):
            raise self.fail(f"invalid workflow name {short_repr(name)} (letters, digits, '_', '-', '.')", ("name",))
        if len(name) > MAX_NAME_LENGTH:  # it names lock files and refs
            given = "" if "name" in self.locations else " (taken from the file name; set `name:`)"
            raise self.fail(f"workflow name longer than {MAX_NAME_LENGTH} characters{given}", ("name",))
        raw_params = self.expect(document.get("params"), dict, ("params",), "a mapping of params")
        defaults = self.expect(document.get("defaults"), dict, ("defaults",), "a mapping")
        for key in defaults:
            if key not in DEFAULTS_KEYS:
                raise self.fail(f"unknown key {key!r} in defaults (known: {', '.join(DEFAULTS_KEYS)})",
                                ("defaults", key))
        raw_stages = self.expect(document.get("stages"), dict, ("stages",), "a mapping of stage name -> stage")
        if not raw_stages:
            raise self.fail("the workflow defines no stages", ("stages",))
        for stage_name in raw_stages:
            if not STAGE_NAME.fullmatch(stage_name):
                raise self.fail(f"invalid stage name {short_repr(stage_name)} (letters, digits, '_' and '-'; "
                                "must not start with a digit or '-')", ("stages", stage_name))
            if len(stage_name) > MAX_NAME_LENGTH:  # it names files and directories
                raise self.fail(f"stage name longer than {MAX_NAME_LENGTH} characters", ("stages", stage_name))

        resolver = Resolver(raw_params, self.locations, self.env, list(raw_stages))
        resolver.used_secrets = self.used_secrets
        params = {key: resolver.resolve_param(("params", key), value) for key, value in raw_params.items()}
        raw_stages = expand_matrices(self, resolver, raw_stages)  # one stage per entry of each sweep
        resolver.stage_names = list(raw_stages)
        default_launch = self.launch_settings(resolver, defaults, raw_stages)
        self.default_executor = self.executor_settings(resolver, defaults)
        stages = {name: self.stage(name, raw, resolver, default_launch, list(raw_stages))
                  for name, raw in raw_stages.items()}
        self.check_graph(stages)
        return Workflow(name=name, path=self.path.resolve(), params=params, stages=stages,
                        secret_values=frozenset(self.used_secrets | secret_env_values(self.env)))

    def launch_settings(self, resolver: Resolver, defaults: dict, raw_stages: dict) -> dict:
        """Project launch defaults <- workflow `defaults.launch`, validated on their own."""
        raw = self.expect(defaults.get("launch"), dict, ("defaults", "launch"), "a mapping of launch settings")
        merged = dict(self.launch_defaults)
        merged.update(resolver.resolve(raw, ("defaults", "launch"), allow_stages=False))
        self.validate_launch(merged, ("defaults", "launch"), origin_paths=[("defaults", "launch")])
        return merged

    def executor_settings(self, resolver: Resolver, defaults: dict) -> dict:
        """Project [executor] (vlflow.toml) <- workflow `defaults.executor`, validated on their own."""
        raw = self.expect(defaults.get("executor"), dict, ("defaults", "executor"), "a mapping of executor settings")
        merged = {**self.executor_defaults, **resolver.resolve(raw, ("defaults", "executor"), allow_stages=False)}
        self.validate_executor(merged, ("defaults", "executor"), origin_paths=[("defaults", "executor")])
        return merged

    def validate_executor(self, settings: dict, path: KeyPath, origin_paths: list[KeyPath]) -> ExecutorSpec:
        problem = bool_for_number(ExecutorSpec, settings)
        if problem is None:
            try:
                return ExecutorSpec(**settings)
            except pydantic.ValidationError as exc:
                problem = pydantic_problem(exc, list(ExecutorSpec.model_fields), "executor setting")
        loc, message = problem
        loc = loc if isinstance(loc, tuple) else (loc,) if loc is not None else ()
        key = loc[0] if loc else None
        at = next((p for p in [(*o, key) for o in origin_paths] if p in self.locations), None)
        if at is None and key in self.executor_defaults:
            message += " (from [executor] in vlflow.toml)"
        raise self.fail(message, (*path, *loc), at=at or path)

    def validate_launch(self, settings: dict, path: KeyPath, origin_paths: list[KeyPath],
                        spec: StageSpec | None = None) -> LaunchSpec:
        problem = bool_for_number(LaunchSpec, settings)
        if problem is None:
            try:
                launch = LaunchSpec(**settings)
            except pydantic.ValidationError as exc:
                problem = pydantic_problem(exc, list(LaunchSpec.model_fields), "launch setting")
            else:
                problem = launch_conflict(launch) or (spec and model_parallel_conflict(spec, launch))
                if problem is None:
                    return launch
        loc, message = problem
        loc = loc if isinstance(loc, tuple) else (loc,) if loc is not None else ()
        key = loc[0] if loc else None
        field_path = (*path, *loc)
        at = next((p for p in [(*o, key) for o in origin_paths] if p in self.locations), None)
        if at is None and key in self.launch_defaults:
            message += " (from the project's launch defaults)"
        raise self.fail(message, field_path, at=at or path)

    def stage(self, name: str, raw: Any, resolver: Resolver, default_launch: dict, stage_names: list[str]
              ) -> StageDecl:
        path = ("stages", name)
        raw = self.expect(raw, dict, path, "a stage mapping (with `uses:`)")
        for key in raw:
            if key not in STAGE_KEYS:
                raise self.fail(f"unknown stage key {key!r}{suggest(key, STAGE_KEYS)}", (*path, key))
        if "uses" not in raw:
            raise self.fail("missing `uses:` (the stage type)", path)
        uses = self.expect(raw["uses"], str, (*path, "uses"), "a stage type name")
        spec = self.spec(uses, (*path, "uses"))

        with_path = (*path, "with")
        raw_with = self.expect(raw.get("with"), dict, with_path, "a mapping of parameters")
        resolver.current_stage = name
        values = resolver.resolve(raw_with, with_path)
        resolver.current_stage = None
        problem = bool_for_number(spec.params, values)
        if problem is not None:
            raise self.fail(problem[1], (*with_path, problem[0]))
        try:
            params = spec.params(**values).model_dump(mode="json")
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            message = pydantic_message(error, list(spec.params.model_fields))
            raise self.fail(message + more_errors(exc), (*with_path, *error["loc"])) from None
        as_run = with_stage_outputs_as_paths(values)
        if as_run != values:  # validate what the stage will get: ${stages.S.output} becomes an absolute path
            try:
                spec.params(**as_run)
            except pydantic.ValidationError as exc:
                error = exc.errors()[0]
                message = pydantic_message(error, list(spec.params.model_fields))
                raise self.fail(message + " (${stages.NAME.output} is replaced by the artifact's absolute path when "
                                "the stage runs)", (*with_path, *error["loc"])) from None

        # inputs and needs may name their stages through ${params.X} / ${env.X} (e.g. which model to evaluate)
        inputs_path, needs_path = (*path, "inputs"), (*path, "needs")
        raw_inputs = raw.get("inputs")
        if isinstance(raw_inputs, dict):
            raw_inputs = resolver.resolve(raw_inputs, inputs_path, allow_stages=False)
        inputs = self.inputs(spec, raw_inputs, path, stage_names)
        needs = raw.get("needs")
        if isinstance(needs, (str, list)):
            needs = resolver.resolve(needs, needs_path, allow_stages=False)
        if isinstance(needs, str):
            needs = [needs]
        needs = self.expect(needs, list, needs_path, "a list of stage names")
        for index, needed in enumerate(needs):
            item = (*needs_path, index)
            self.expect(needed, str, item, "a stage name")
            self.check_stage_ref(needed, name, item, stage_names)

        executor_path = (*path, "executor")
        own_executor = self.expect(raw.get("executor"), dict, executor_path, "a mapping of executor settings")
        executor = self.validate_executor(
            {**self.default_executor, **resolver.resolve(own_executor, executor_path, allow_stages=False)},
            executor_path, origin_paths=[executor_path, ("defaults", "executor")])

        launch = None
        launch_path = (*path, "launch")
        if "launch" in raw and not spec.distributed:
            raise self.fail(f"`launch` is only allowed on distributed stages ({uses} runs in one process)",
                            launch_path)
        if spec.distributed:
            own = self.expect(raw.get("launch"), dict, launch_path, "a mapping of launch settings")
            settings = {**default_launch, **resolver.resolve(own, launch_path, allow_stages=False)}
            if executor.is_slurm:  # the allocation's shape, unless the launch says otherwise
                settings.setdefault("nnodes", executor.nodes)
                settings.setdefault("nproc_per_node", max(1, executor.gpus_per_node))
                if executor.nodes > 1:  # the batch script runs on the first node only: srun starts every rank
                    settings.setdefault("launcher", "slurm")  # (torchrun: srun starts one agent per node)
            launch = self.validate_launch(settings, launch_path, origin_paths=[launch_path, ("defaults", "launch")],
                                          spec=spec)

        decl = StageDecl(name=name, uses=uses, params=params, inputs=inputs, needs=list(needs), launch=launch,
                         file=self.where(path).file, line=self.where(path).line, executor=executor)
        for ref in sorted(decl.deps() - {r.stage for r in inputs.values()} - set(needs)):
            self.check_stage_ref(ref, name, with_path, stage_names)  # e.g. from an escaped `$${stages...}`
        return decl

    def spec(self, uses: str, path: KeyPath) -> StageSpec:
        try:
            return get_spec(uses)
        except KeyError:
            raise self.fail(f"unknown stage type {uses!r}{suggest(uses, sorted(registry()))}", path) from None

    def inputs(self, spec: StageSpec, raw: Any, path: KeyPath, stage_names: list[str]) -> dict[str, InputRef]:
        inputs_path = (*path, "inputs")
        raw = self.expect(raw, dict, inputs_path, "a mapping of input name -> STAGE or STAGE/sub/path")
        declared = [*spec.inputs, *spec.optional_inputs]
        refs = {}
        for key, value in raw.items():
            item = (*inputs_path, key)
            if key not in declared:
                takes = f"takes: {', '.join(declared)}" if declared else "takes no inputs"
                close = difflib.get_close_matches(key, declared, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(f"unknown input {key!r} ({hint}{spec.name} {takes})", item)
            self.expect(value, str, item, "STAGE or STAGE/sub/path")
            stage, _, sub = value.strip().partition("/")
            subpath = PurePosixPath(sub) if sub else None
            if subpath is not None and (subpath.is_absolute() or ".." in subpath.parts or "" in sub.split("/")[:-1]):
                raise self.fail(f"invalid path {sub!r} inside stage {stage!r} (relative, without '..' or '//')",
                                item)
            self.check_stage_ref(stage, path[1], item, stage_names, what="input")
            refs[key] = InputRef(stage, str(subpath) if subpath is not None and str(subpath) != "." else "")
        for required in spec.inputs:
            if required not in refs:
                raise self.fail(f"missing required input {required!r} of {spec.name}", (*inputs_path, required))
        return refs

    def check_stage_ref(self, stage: str, owner: str, path: KeyPath, stage_names: list[str], what: str = "need"
                        ) -> None:
        if stage == owner:
            raise self.fail(f"stage {owner!r} depends on itself", path)
        if stage not in stage_names:
            label = "dangling input" if what == "input" else "unknown stage"
            raise self.fail(f"{label}: no stage named {stage!r} in this workflow{suggest(stage, stage_names)}",
                            path)

    def check_graph(self, stages: dict[str, StageDecl]) -> None:
        graph = dag.DiGraph()
        graph.add_nodes_from(stages)
        for name, decl in stages.items():
            graph.add_edges_from((dep, name) for dep in decl.deps())
        try:
            cycle = dag.find_cycle(graph)
        except dag.NoCycle:
            return
        names = [edge[0] for edge in cycle]
        order = list(stages)
        start = min(range(len(names)), key=lambda i: order.index(names[i]))  # one message whichever cycle is met
        names = names[start:] + names[:start] + [names[start]]
        raise self.fail("dependency cycle: " + " -> ".join(names), ("stages", names[0]))
