"""Workflow files: YAML -> validated `Workflow`, with `file:line` + dotted field path in every error.

Loading happens in phases, each on plain Python data plus a map of where every value was written:
1. parse each file (duplicate keys and non-string keys are errors), merge `extends` then `include`s under it,
2. apply `--set PATH=VALUE` overrides to the merged document,
3. resolve `${...}` references in `params`, then in each stage's `with`, `inputs`, `needs` and `launch`,
4. validate each stage against its `StageSpec` (pydantic params, declared inputs, launch settings),
5. check the dependency graph (dangling references, self-dependencies, cycles).

`${stages.S.output}` is kept verbatim in the resolved params; the runner replaces it with S's local artifact path.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import stat
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pydantic
import yaml

from vlflow import dag
from vlflow.errors import WorkflowError
from vlflow.executors.spec import ExecutorSpec
from vlflow.extend import merge_own_file
from vlflow.matrix import MATRIX_KEY, STAGE_REF_NAME, expand_matrices
from vlflow.secrets import MASK, Masker, looks_secret, mask_credentials, secret_env_values
from vlflow.stage import LaunchSpec, StageSpec, get_spec, registry

TOP_LEVEL_KEYS = ("name", "include", "extends", "params", "defaults", "stages")
STAGE_KEYS = ("uses", "with", "inputs", "needs", "launch", MATRIX_KEY, "executor")
DEFAULTS_KEYS = ("launch", "executor")
STAGE_NAME = re.compile(STAGE_REF_NAME)  # a sweep entry (`finetune@lr=0.1`) is a stage name too
WORKFLOW_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Bounds on what one workflow may make the loader do: far above any real workflow, far below a resource bomb.
MAX_FILE_BYTES = 1 << 20  # one workflow or included file
MAX_INCLUDE_DEPTH = 32  # include/extends nesting
MAX_FILES_READ = 256  # include/extends files read in total (a file included twice counts twice)
MAX_YAML_DEPTH = 64  # nesting of mappings and lists in one document
MAX_YAML_VALUES = 100_000  # values of one document after alias expansion
MAX_YAML_ALIASES = 1_000  # `*name` uses in one document
MAX_REFERENCE_CHAIN = 32  # ${params.a} -> ${params.b} -> ...
MAX_NAME_LENGTH = 100  # workflow and stage names (they become file names and lock names)
# Tags a workflow may use explicitly; anything else (`!!python/object`, `!custom`, `!!binary`, `!!set`) is refused.
ALLOWED_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("map", "seq", "str", "int", "float", "bool", "null",
                                                          "merge")}

# `$${` is an escaped literal `${`; `${...}` is a reference; a `${` that is neither is unterminated.
_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_STAGE_OUTPUT = re.compile(r"stages\.(" + STAGE_REF_NAME + r")\.output")
_ENV = re.compile(r"env\.([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_STAGE_OUTPUT_TEXT = re.compile(r"\$\{stages\.(" + STAGE_REF_NAME + r")\.output\}")


@dataclass(frozen=True)
class InputRef:
    """An input wired to another stage's artifact, or to a file/directory inside it."""

    stage: str
    subpath: str = ""  # "" for the whole artifact, else a relative POSIX path such as "karpathy/dataset_coco.json"

    def __str__(self) -> str:
        return f"{self.stage}/{self.subpath}" if self.subpath else self.stage


@dataclass
class StageDecl:
    name: str
    uses: str
    params: dict  # the resolved `with` block, validated and dumped with model_dump(mode="json") (defaults explicit)
    inputs: dict[str, InputRef]
    needs: list[str]  # ordering-only dependencies
    launch: LaunchSpec | None  # only for distributed stage types
    file: str
    line: int
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)  # where it runs; not part of its cache key

    def deps(self) -> set[str]:
        """Stages this one depends on: its inputs, `needs`, and `${stages.X.output}` references in its params."""
        found = {ref.stage for ref in self.inputs.values()} | set(self.needs)
        _collect_stage_outputs(self.params, found)
        return found


@dataclass
class Workflow:
    name: str
    path: Path
    params: dict
    stages: dict[str, StageDecl]  # in file order
    # Values to mask in output: those interpolated from secret-looking variables (any length) and the long enough
    # values of every secret-looking variable of the environment the workflow was loaded with.
    secret_values: frozenset[str] = field(default=frozenset(), repr=False)

    def masker(self) -> Masker:
        return Masker(self.secret_values, min_length=1)

    def to_dict(self) -> dict:
        """The resolved workflow as a document `load_workflow` accepts again (secrets shown as ***)."""
        stages = {}
        for name, decl in self.stages.items():
            entry: dict[str, Any] = {"uses": decl.uses, "with": decl.params}
            if decl.inputs:
                entry["inputs"] = {key: str(ref) for key, ref in decl.inputs.items()}
            if decl.needs:
                entry["needs"] = list(decl.needs)
            if decl.launch is not None:
                entry["launch"] = decl.launch.model_dump(mode="json")
            if decl.executor != ExecutorSpec():
                entry["executor"] = decl.executor.model_dump(mode="json", exclude_defaults=True)
            stages[name] = entry
        document = {"name": self.name, "params": self.params, "stages": stages}
        return _escape_for_output(mask_credentials(document), self.masker())


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


# ---------------------------------------------------------------------------------------------------------------
# YAML with locations


class Location(NamedTuple):
    file: str | None
    line: int | None


KeyPath = tuple  # a path of keys into the document: ("stages", "train", "with", "max_steps"); list items by index
Locations = dict  # KeyPath -> Location


def _dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without the timestamp resolver: `2021-01-01` stays a string (stage params are JSON values).

    Composing refuses nesting deeper than MAX_YAML_DEPTH (PyYAML's composer recurses per level)."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0
        self.values = 0  # values constructed so far, aliases expanded (bounded: billion laughs)
        self.aliases = 0

    def flatten_mapping(self, node, active: frozenset = frozenset()):
        """PyYAML's `<<` merge, refusing a merge that would copy more than MAX_YAML_VALUES keys (each merged
        mapping's keys are copied into the merging one, so chained merges multiply like aliases do)."""
        total = len(node.value)
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                continue
            for sub in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                if not isinstance(sub, yaml.MappingNode):
                    continue  # PyYAML's own flatten_mapping reports it
                if id(sub) in active or sub is node:
                    raise WorkflowError("recursive YAML merge (`<<`) of a mapping into itself", file=self.file,
                                        line=sub.start_mark.line + 1)
                self.flatten_mapping(sub, active | {id(node)})
                total += len(sub.value)
                if total > MAX_YAML_VALUES:
                    raise WorkflowError(f"`<<` merges copy more than {MAX_YAML_VALUES:,} keys (is this a merge "
                                        "bomb?)", file=self.file, line=key_node.start_mark.line + 1)
        super().flatten_mapping(node)

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise WorkflowError(f"mappings and lists nest more than {MAX_YAML_DEPTH} levels deep",
                                    file=self.file, line=mark.line + 1)
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:  # refused while parsing, before anything is expanded
                    raise WorkflowError(f"more than {MAX_YAML_ALIASES:,} YAML aliases (*name) in one file",
                                        file=self.file, line=self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]  # `=` stays a string
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float.
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _parse_yaml(text: str, file: str) -> tuple[Any, Locations]:
    """Parse one YAML document into plain data and the line of every mapping key / sequence item."""
    try:
        loader = _YamlLoader(text, file)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, control characters)
        raise _reader_error(exc, text, file) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {(): Location(file, 1)}
        locations: Locations = {(): Location(file, root.start_mark.line + 1)}
        data = _from_node(loader, root, (), locations, file, active=set())
        return data, locations
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem or "\t" in problem:
            problem = "tab character; YAML indentation must use spaces"
        elif exc.context and exc.problem and exc.problem.startswith("but "):
            problem = f"{exc.context}, {exc.problem}"
        elif exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        raise WorkflowError(f"invalid YAML: {problem}", file=file,
                            line=None if mark is None else mark.line + 1) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}", file=file) from None
    finally:
        loader.dispose()


def _reader_error(exc: yaml.reader.ReaderError, text: str, file: str) -> WorkflowError:
    character = exc.character
    code = ord(character) if isinstance(character, str) else character
    line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
    return WorkflowError(f"invalid YAML: character U+{code:04X} is not allowed (control characters, NUL bytes and "
                         "unpaired surrogates cannot appear in YAML; write them as escapes in a double-quoted "
                         "string)", file=file, line=line)


def _check_tag(node: yaml.Node, path: KeyPath, file: str) -> None:
    if node.tag not in ALLOWED_TAGS:
        raise WorkflowError(f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed (workflows "
                            "hold plain mappings, lists, strings, numbers, booleans and null)", file=file,
                            line=node.start_mark.line + 1, field=_dotted(path) or None)


def _from_node(loader: _YamlLoader, node: yaml.Node, path: KeyPath, locations: Locations, file: str,
               active: set[int]) -> Any:
    loader.values += 1
    if loader.values > MAX_YAML_VALUES:
        raise WorkflowError(f"the document expands to more than {MAX_YAML_VALUES:,} values (YAML aliases such as "
                            "*name repeat what they refer to; is this an alias bomb?)", file=file,
                            line=node.start_mark.line + 1, field=_dotted(path) or None)
    _check_tag(node, path, file)
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node)
    if id(node) in active:  # an alias inside itself (`a: &x [*x]`)
        raise WorkflowError("recursive YAML alias", file=file, line=node.start_mark.line + 1, field=_dotted(path))
    active = active | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            item_path = (*path, index)
            locations[item_path] = Location(file, item.start_mark.line + 1)
            items.append(_from_node(loader, item, item_path, locations, file, active))
        return items
    # A mapping. Duplicate keys are errors (PyYAML keeps the last silently); `<<` merge keys are allowed to be
    # overridden by the mapping's own keys, so duplicates are checked before flattening them in.
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            shown = "a complex key" if key is None and not isinstance(key_node, yaml.ScalarNode) else repr(key)
            raise WorkflowError(f"mapping keys must be strings, got {shown} (quote it)", file=file, line=line,
                                field=_dotted(path) or None)
        if key in first_line:
            raise WorkflowError(f"duplicate key {key!r} (first defined on line {first_line[key]})", file=file,
                                line=line, field=_dotted((*path, key)))
        first_line[key] = line
    uses_merge_keys = any(key_node.tag == "tag:yaml.org,2002:merge" for key_node, _ in node.value)
    loader.flatten_mapping(node)
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str):
            raise WorkflowError(f"mapping keys must be strings, got {key!r}", file=file,
                                line=key_node.start_mark.line + 1, field=_dotted(path) or None)
        key_path = (*path, key)
        if uses_merge_keys:
            _drop_under(locations, key_path)  # a key from `<<` replaced by the mapping's own
        locations[key_path] = Location(file, key_node.start_mark.line + 1)
        mapping[key] = _from_node(loader, value_node, key_path, locations, file, active)
    return mapping


def _drop_under(locations: Locations, prefix: KeyPath) -> None:
    n = len(prefix)
    for key in [k for k in locations if k[:n] == prefix]:
        del locations[key]


def _deep_merge(base: dict, base_locs: Locations, over: dict, over_locs: Locations, path: KeyPath = ()) -> None:
    """Merge `over` into `base` in place: mappings merge key by key, anything else is replaced."""
    for key, value in over.items():
        key_path = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], base_locs, value, over_locs, key_path)  # the key keeps its first location
        else:
            base[key] = copy.deepcopy(value)
            _drop_under(base_locs, key_path)
            n = len(key_path)
            base_locs.update({k: loc for k, loc in over_locs.items() if k[:n] == key_path})


# ---------------------------------------------------------------------------------------------------------------
# Interpolation


def _with_stage_outputs_as_paths(value: Any) -> Any:
    """`value` with every ${stages.S.output} replaced by an absolute path, as the runner will do."""
    if isinstance(value, str):
        return _STAGE_OUTPUT_TEXT.sub(lambda m: f"/vlflow/artifacts/{m.group(1)}", value)
    if isinstance(value, dict):
        return {k: _with_stage_outputs_as_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_stage_outputs_as_paths(v) for v in value]
    return value


def _collect_stage_outputs(value: Any, found: set[str]) -> None:
    if isinstance(value, str):
        found.update(_STAGE_OUTPUT_TEXT.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            _collect_stage_outputs(item, found)
    elif isinstance(value, list):
        for item in value:
            _collect_stage_outputs(item, found)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


class _Resolver:
    """Resolves `${params.*}`, `${env.*}` and `${stages.S.output}` in values, recording the stages referenced."""

    def __init__(self, raw_params: dict, locations: Locations, env: Mapping[str, str], stage_names: list[str]):
        self.raw_params = raw_params
        self.locations = locations
        self.env = env
        self.stage_names = stage_names
        self.resolved: dict[KeyPath, Any] = {}  # params path -> resolved value
        self.in_progress: list[KeyPath] = []
        self.used_secrets: set[str] = set()
        self.current_stage: str | None = None  # the stage whose values are being resolved

    def where(self, path: KeyPath) -> Location:
        while path and path not in self.locations:
            path = path[:-1]
        return self.locations.get(path, Location(None, None))

    def fail(self, message: str, path: KeyPath) -> WorkflowError:
        file, line = self.where(path)
        return WorkflowError(message, file=file, line=line, field=_dotted(path))

    def resolve(self, value: Any, path: KeyPath, allow_stages: bool = True) -> Any:
        if isinstance(value, str):
            return self._resolve_text(value, path, allow_stages)
        if isinstance(value, dict):
            return {k: self.resolve(v, (*path, k), allow_stages) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, (*path, i), allow_stages) for i, v in enumerate(value)]
        return value

    def _resolve_text(self, text: str, path: KeyPath, allow_stages: bool) -> Any:
        matches = list(_TOKEN.finditer(text))
        if not matches:
            return text
        only = matches[0]
        if len(matches) == 1 and only.span() == (0, len(text)) and only.group(1) is not None:
            return self._reference(only.group(1), path, allow_stages)  # exactly one reference: keep its type
        pieces, position = [], 0
        for match in matches:
            pieces.append(text[position:match.start()])
            position = match.end()
            token = match.group(0)
            if token == "$${":
                if _STAGE_OUTPUT_TEXT.match(text, match.start() + 1):
                    raise self.fail("a stage output reference cannot be escaped: the runner replaces every "
                                    "${stages.NAME.output} in params with a path", path)
                pieces.append("${")
            elif match.group(1) is None:
                raise self.fail(f"unterminated or nested '${{' in {text!r} (write '$${{' for a literal '${{')", path)
            else:
                value = self._reference(match.group(1), path, allow_stages)
                if isinstance(value, (dict, list)):
                    raise self.fail(f"{token} is a {type(value).__name__}; it cannot be inserted into text "
                                    f"(use it as the whole value)", path)
                pieces.append(_as_text(value))
        pieces.append(text[position:])
        return "".join(pieces)

    def _reference(self, body: str, path: KeyPath, allow_stages: bool) -> Any:
        expression = body.strip()
        if expression.startswith("params.") or expression == "params":
            keys = [part for part in expression.split(".")[1:]]
            if not keys or any(not part for part in keys):
                raise self.fail(f"malformed reference ${{{body}}} (expected ${{params.NAME}})", path)
            return self._param(keys, body, path)
        if expression.startswith("env.") or expression == "env":
            match = _ENV.fullmatch(expression)
            if match is None:
                raise self.fail(f"malformed reference ${{{body}}} (expected ${{env.NAME}} or ${{env.NAME:-default}})",
                                path)
            name, default = match.group(1), match.group(2)
            if name in self.env:
                value = self.env[name]
            elif default is not None:
                value = default
            else:
                raise self.fail(f"environment variable {name} is not set (give a default: ${{env.{name}:-value}})",
                                path)
            if looks_secret(name) and value:
                self.used_secrets.add(value)
            return value
        if expression.startswith("stages.") or expression == "stages":
            match = _STAGE_OUTPUT.fullmatch(expression)
            if match is None:
                raise self.fail(f"malformed reference ${{{body}}} (expected ${{stages.NAME.output}})", path)
            if not allow_stages:
                raise self.fail(f"${{{body}}} is only allowed in a stage's `with` block", path)
            stage = match.group(1)
            if stage == self.current_stage:
                raise self.fail(f"stage {stage!r} depends on itself", path)
            if stage not in self.stage_names:
                raise self.fail(f"${{{body}}} names no stage of this workflow{_suggest(stage, self.stage_names)}",
                                path)
            return f"${{stages.{stage}.output}}"  # kept for the runner
        raise self.fail(f"unknown reference ${{{body}}} (expected ${{params.NAME}}, ${{env.NAME}}, "
                        f"${{env.NAME:-default}} or ${{stages.NAME.output}})", path)

    def _param(self, keys: list[str], body: str, path: KeyPath) -> Any:
        """The resolved value of params.<keys>, resolving only what the lookup passes through."""
        current_path: KeyPath = ("params",)
        current: Any = self.raw_params
        resolved = False  # once inside a resolved value, nothing below it needs resolving again
        for key in keys:
            if not resolved and isinstance(current, str) and current_path != ("params",):
                current, resolved = self.resolve_param(current_path, current), True  # navigate through a ${...}
            if isinstance(current, dict) and key in current:
                current = current[key]
            elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
                current = current[int(key)]
            elif isinstance(current, dict):
                raise self.fail(f"unknown reference ${{{body}}}: no {_dotted(current_path)}.{key}"
                                f"{_suggest(key, list(current))}", path)
            else:
                raise self.fail(f"unknown reference ${{{body}}}: {_dotted(current_path)} is "
                                f"{_type_name(current)}, it has no {key!r}", path)
            current_path = (*current_path, key)
        if not resolved:
            current = self.resolve_param(current_path, current)
        return copy.deepcopy(current)

    def resolve_param(self, param_path: KeyPath, raw: Any) -> Any:
        key = tuple(str(part) for part in param_path)
        if key in self.resolved:
            return self.resolved[key]
        if key in self.in_progress:
            cycle = self.in_progress[self.in_progress.index(key):] + [key]
            raise self.fail("reference cycle: " + " -> ".join(_dotted(p) for p in cycle), self.in_progress[0])
        if len(self.in_progress) >= MAX_REFERENCE_CHAIN:
            first, last = _dotted(self.in_progress[0]), _dotted(key)
            raise self.fail(f"reference chain longer than {MAX_REFERENCE_CHAIN} (${{...}} referring to ${{...}} "
                            f"from {first} to {last}); refer to the value directly", self.in_progress[0])
        self.in_progress.append(key)
        try:
            value = self.resolve(raw, _typed_path(param_path, self.raw_params))
        finally:
            self.in_progress.pop()
        self.resolved[key] = value
        return value


def _typed_path(param_path: KeyPath, raw_params: dict) -> KeyPath:
    """("params", "sizes", "0") -> ("params", "sizes", 0) so list items find their locations."""
    out: list = ["params"]
    current: Any = raw_params
    for part in param_path[1:]:
        if isinstance(current, list):
            part = int(part)
            current = current[part]
        elif isinstance(current, dict):
            current = current.get(part)
        out.append(part)
    return tuple(out)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=3)
    if close:
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f" (known: {', '.join(str(c) for c in choices)})" if choices else ""


def _escape_for_output(value: Any, masker: Masker) -> Any:
    """Mask secrets and re-escape literal `${` so the dumped document loads back to the same workflow."""
    if isinstance(value, dict):
        return {k: _escape_for_output(v, masker) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_for_output(v, masker) for v in value]
    if isinstance(value, str):
        value = masker.mask(value)
    elif value is not None and not isinstance(value, bool) and masker.contains(str(value)):
        return MASK  # e.g. a numeric secret that a param coerced to an int
    if isinstance(value, str) and "${" in value:
        parts = _STAGE_OUTPUT_TEXT.split(value)  # stage references stay; every other `${` is literal text
        for index in range(0, len(parts), 2):
            parts[index] = parts[index].replace("${", "$${")
        for index in range(1, len(parts), 2):
            parts[index] = f"${{stages.{parts[index]}.output}}"
        return "".join(parts)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def _printable(text: str) -> str:
    """`text` with control characters escaped, so an error about it stays one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader:
    def __init__(self, path: Path, overrides: list[str], launch_defaults: dict, env: Mapping[str, str],
                 include_paths: list[Path]):
        self.path = path
        self.overrides = overrides
        self.launch_defaults = launch_defaults
        self.env = env
        self.locations: Locations = {}
        # Where include/extends may read: the workflow's own directory tree, then the configured extra trees.
        self.include_roots = [path.resolve().parent, *(Path(p).resolve() for p in include_paths)]
        self.files_read = 0
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
        return WorkflowError(message, file=file, line=line, field=_dotted(path) or None)

    def expect(self, value: Any, kind: type, path: KeyPath, what: str) -> Any:
        """`value` if it is a `kind` (an empty block counts as an empty mapping/list), else an error."""
        if value is None and kind in (dict, list):
            return kind()
        if not isinstance(value, kind):
            got = _type_name(value)
            if value is not None and not isinstance(value, (dict, list)):
                got += f" {_short_repr(value)}"
            raise self.fail(f"expected {what}, got {got}", path)
        return value

    # -- phases ------------------------------------------------------------------------------------------------

    def load(self) -> Workflow:
        document, self.locations = self.read_document(self.path, chain=[])
        name_given = "name" in document and self.locations.get(("name",), Location(None, None)).file == str(self.path)
        self.apply_overrides(document)
        for key in ("include", "extends"):
            if key in document:
                raise self.fail(f"`{key}` cannot be changed with --set (files are merged before overrides)",
                                (key,))
        if not name_given and not any(o.split("=", 1)[0].strip() == "name" for o in self.overrides):
            document["name"] = self.path.stem  # an extending file is its own workflow, not its base's
        for key in document:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}", (key,))
        name = self.expect(document.get("name"), str, ("name",), "a string")
        if not WORKFLOW_NAME.fullmatch(name):
            raise self.fail(f"invalid workflow name {_short_repr(name)} (letters, digits, '_', '-', '.')", ("name",))
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
                raise self.fail(f"invalid stage name {_short_repr(stage_name)} (letters, digits, '_' and '-'; "
                                "must not start with a digit or '-')", ("stages", stage_name))
            if len(stage_name) > MAX_NAME_LENGTH:  # it names files and directories
                raise self.fail(f"stage name longer than {MAX_NAME_LENGTH} characters", ("stages", stage_name))

        resolver = _Resolver(raw_params, self.locations, self.env, list(raw_stages))
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

    def read_document(self, path: Path, chain: list[Path], origin: tuple[str, int | None, str] | None = None
                      ) -> tuple[dict, Locations]:
        """One file with its `extends` and `include`s merged in (the file itself wins)."""
        file = str(path)
        real = path.resolve()
        if real in chain:
            names = [str(p.name) for p in chain[chain.index(real):]] + [real.name]
            ofile, oline, ofield = origin
            raise WorkflowError("include cycle: " + " -> ".join(names), file=ofile, line=oline, field=ofield)
        if origin is not None:
            self.check_include(path, real, chain, origin)
        text = self.read_text(path, origin)
        data, locations = _parse_yaml(text, file)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise WorkflowError(f"a workflow file must be a mapping of keys, got {_type_name(data)}", file=file,
                                line=locations[()].line)
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                loc = locations[(key,)]
                raise WorkflowError(f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}", file=file,
                                    line=loc.line, field=key)
        chain = [*chain, real]
        merged: dict = {}
        merged_locs: Locations = {}
        bases: list[tuple[str, KeyPath]] = []
        if "extends" in data:
            extends = data.pop("extends")
            if not isinstance(extends, str) or not extends:
                loc = locations[("extends",)]
                raise WorkflowError(f"expected one file path, got {_type_name(extends)}", file=file, line=loc.line,
                                    field="extends")
            bases.append((extends, ("extends",)))
        if "include" in data:
            includes = data.pop("include")
            if isinstance(includes, str):
                includes = [includes]
            if not isinstance(includes, list):
                loc = locations[("include",)]
                raise WorkflowError(f"expected a list of file paths, got {_type_name(includes)}", file=file,
                                    line=loc.line, field="include")
            for index, item in enumerate(includes):
                item_path = ("include", index) if ("include", index) in locations else ("include",)
                if not isinstance(item, str) or not item:
                    raise WorkflowError(f"expected a file path, got {_type_name(item)}", file=file,
                                        line=locations[item_path].line, field=_dotted(item_path))
                bases.append((item, item_path))
        for relative, key_path in bases:
            origin_here = (file, locations[key_path].line, _dotted(key_path))
            if "\x00" in relative or len(relative) > 4096:
                raise WorkflowError("invalid file path (a NUL byte, or longer than 4096 characters)", file=file,
                                    line=origin_here[1], field=origin_here[2])
            target = Path(os.path.normpath(path.parent / relative))
            base, base_locs = self.read_document(target, chain, origin_here)
            _deep_merge(merged, merged_locs, base, base_locs)
        own_locs = {k: v for k, v in locations.items() if k and k[0] not in ("include", "extends")}
        merge_own_file(merged, merged_locs, data, own_locs, file)  # deep merge, but `replace:`/`delete:` stages
        merged_locs[()] = locations[()]
        return merged, merged_locs

    def check_include(self, path: Path, real: Path, chain: list[Path], origin: tuple[str, int | None, str]) -> None:
        """Refuse includes outside the allowed trees, too deep, or too many (before opening anything)."""
        ofile, oline, ofield = origin
        if not any(real.is_relative_to(root) for root in self.include_roots):
            roots = ", ".join(str(root) for root in self.include_roots)
            raise WorkflowError(f"included file {path} is outside the workflow's directory tree (allowed: {roots}; "
                                "add a directory to `[workflow] include_paths` in vlflow.toml to allow more)",
                                file=ofile, line=oline, field=ofield)
        if len(chain) >= MAX_INCLUDE_DEPTH:
            raise WorkflowError(f"include/extends nest more than {MAX_INCLUDE_DEPTH} files deep", file=ofile,
                                line=oline, field=ofield)
        self.files_read += 1
        if self.files_read > MAX_FILES_READ:
            raise WorkflowError(f"include/extends read more than {MAX_FILES_READ} files in total (a file included "
                                "from several places is read each time)", file=ofile, line=oline, field=ofield)

    def read_text(self, path: Path, origin: tuple[str, int | None, str] | None) -> str:
        """A regular file's text, at most MAX_FILE_BYTES; FIFOs and devices are refused without reading."""
        file = str(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it without reading.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            if origin is None:
                raise WorkflowError("workflow file not found", file=file) from None
            ofile, oline, ofield = origin
            raise WorkflowError(f"included file not found: {file}", file=ofile, line=oline, field=ofield) from None
        except OSError as exc:
            raise WorkflowError(f"cannot read workflow file: {exc.strerror or exc}", file=file) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            if origin is not None:
                ofile, oline, ofield = origin
                raise WorkflowError(f"included file {file} is {kind}, not a regular file", file=ofile,
                                    line=oline, field=ofield)
            raise WorkflowError(f"the workflow file is {kind}, not a regular file", file=file)
        with os.fdopen(fd, "rb") as handle:
            try:
                data = handle.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                raise WorkflowError(f"cannot read workflow file: {exc.strerror or exc}", file=file) from None
        if len(data) > MAX_FILE_BYTES:
            raise WorkflowError(f"file larger than {MAX_FILE_BYTES // (1 << 20)} MiB; workflow files are small",
                                file=file)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise WorkflowError(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", file=file, line=line) from None

    def apply_overrides(self, document: dict) -> None:
        for override in self.overrides:
            origin = f"--set {_printable(override)}"
            key, sep, text = override.partition("=")
            key = key.strip()
            if not sep:
                raise WorkflowError("expected PATH=VALUE (e.g. --set params.seed=3)", file=origin)
            parts = key.split(".")
            if len(parts) > MAX_YAML_DEPTH:
                raise WorkflowError(f"path nests more than {MAX_YAML_DEPTH} keys deep",
                                    file=origin if len(origin) <= 120 else origin[:117] + "...")
            if not key or any(not part for part in parts):
                raise WorkflowError(f"empty path segment in {key!r} (expected dotted keys such as "
                                    "stages.train.with.steps)", file=origin)
            if text.strip() == "":
                value: Any = ""
            else:
                try:
                    value, _ = _parse_yaml(text, origin)
                except WorkflowError as exc:
                    raise WorkflowError(f"cannot parse value {text!r}: {exc.message}", file=origin,
                                        field=key) from None
            if parts[0] == "params" and len(parts) > 1:
                self.check_param_exists(document.get("params"), parts, origin, key)
            target = document
            for depth, part in enumerate(parts[:-1]):
                if part not in target or target[part] is None:
                    target[part] = {}
                    self.locations[tuple(parts[: depth + 1])] = Location(origin, None)
                if not isinstance(target[part], dict):
                    where = ".".join(parts[: depth + 1])
                    raise WorkflowError(f"{where} is {_type_name(target[part])}, not a mapping",
                                        file=origin, field=key)
                target = target[part]
            target[parts[-1]] = value
            path = tuple(parts)
            _drop_under(self.locations, path)
            self.locations[path] = Location(origin, None)
            if isinstance(value, (dict, list)):  # everything under it comes from the override too
                _mark_all(value, path, self.locations, Location(origin, None))

    @staticmethod
    def check_param_exists(params: Any, parts: list[str], origin: str, key: str) -> None:
        """`--set params.X=...` changes a param the workflow defines: a new one would be used by nothing (a typo)."""
        current = params if isinstance(params, dict) else {}
        for depth, part in enumerate(parts[1:], start=1):
            if isinstance(current, list) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
                continue
            if not isinstance(current, dict) or part not in current:
                where = ".".join(parts[:depth])
                known = list(current) if isinstance(current, dict) else []
                hint = _suggest(part, known) if known else ""
                raise WorkflowError(f"the workflow defines no {where}.{part}{hint}; --set only changes params "
                                    "the workflow defines (add it under `params:` first)", file=origin, field=key)
            current = current[part]

    def launch_settings(self, resolver: _Resolver, defaults: dict, raw_stages: dict) -> dict:
        """Project launch defaults <- workflow `defaults.launch`, validated on their own."""
        raw = self.expect(defaults.get("launch"), dict, ("defaults", "launch"), "a mapping of launch settings")
        merged = dict(self.launch_defaults)
        merged.update(resolver.resolve(raw, ("defaults", "launch"), allow_stages=False))
        self.validate_launch(merged, ("defaults", "launch"), origin_paths=[("defaults", "launch")])
        return merged

    def executor_settings(self, resolver: _Resolver, defaults: dict) -> dict:
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
                problem = _pydantic_problem(exc, list(ExecutorSpec.model_fields), "executor setting")
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
                problem = _pydantic_problem(exc, list(LaunchSpec.model_fields), "launch setting")
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

    def stage(self, name: str, raw: Any, resolver: _Resolver, default_launch: dict, stage_names: list[str]
              ) -> StageDecl:
        path = ("stages", name)
        raw = self.expect(raw, dict, path, "a stage mapping (with `uses:`)")
        for key in raw:
            if key not in STAGE_KEYS:
                raise self.fail(f"unknown stage key {key!r}{_suggest(key, STAGE_KEYS)}", (*path, key))
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
            message = _pydantic_message(error, list(spec.params.model_fields))
            raise self.fail(message + _more(exc), (*with_path, *error["loc"])) from None
        as_run = _with_stage_outputs_as_paths(values)
        if as_run != values:  # validate what the stage will get: ${stages.S.output} becomes an absolute path
            try:
                spec.params(**as_run)
            except pydantic.ValidationError as exc:
                error = exc.errors()[0]
                message = _pydantic_message(error, list(spec.params.model_fields))
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
            raise self.fail(f"unknown stage type {uses!r}{_suggest(uses, sorted(registry()))}", path) from None

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
            raise self.fail(f"{label}: no stage named {stage!r} in this workflow{_suggest(stage, stage_names)}",
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


def _mark_all(value: Any, path: KeyPath, locations: Locations, location: Location) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        locations[(*path, key)] = location
        _mark_all(item, (*path, key), locations, location)


def _pydantic_message(error: dict, known: list[str], noun: str = "parameter") -> str:
    kind = error["type"]
    if kind == "missing":
        return f"required {noun} missing"
    if kind == "extra_forbidden":
        key = str(error["loc"][-1]) if error["loc"] else "?"
        return f"unknown {noun} {key!r}{_suggest(key, known)}"
    message = error["msg"]
    if kind == "value_error" and message.startswith("Value error, "):  # a validator's own sentence
        message = message[len("Value error, "):]
    if isinstance(error.get("input"), (dict, list)):  # the whole block: the message says what is wrong in it
        return f"{message[0].lower()}{message[1:]}"
    return f"{message[0].lower()}{message[1:]}, got {_short_repr(error.get('input'))}"


def _pydantic_problem(exc: pydantic.ValidationError, known: list[str], noun: str) -> tuple[tuple, str]:
    error = exc.errors()[0]
    return tuple(error["loc"]), _pydantic_message(error, known, noun=noun) + _more(exc)


def _numeric_only(annotation: Any) -> bool:
    """Whether a field annotation takes numbers (int/float, optionally None) and no booleans."""
    import typing

    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    args = [a for a in args if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


def bool_for_number(model: type[pydantic.BaseModel], values: Mapping) -> tuple[str, str] | None:
    """(field, message) when a boolean is given for a number: pydantic would read `true` as 1 silently."""
    for name, value in values.items():
        field_info = model.model_fields.get(name)
        if isinstance(value, bool) and field_info is not None and _numeric_only(field_info.annotation):
            kind = "an integer" if field_info.annotation is int else "a number"
            return name, f"expected {kind}, got a boolean {str(value).lower()}"
    return None


def launch_conflict(launch: LaunchSpec) -> tuple[str, str] | None:
    """(field, message) for settings the chosen plugin would ignore (so a run does not silently differ)."""
    if launch.plugin != "hybrid_parallel":
        for name in ("tp_size", "pp_size"):
            if getattr(launch, name) != 1:
                return name, (f"{name}={getattr(launch, name)} needs plugin: hybrid_parallel (plugin "
                              f"{launch.plugin} has no tensor/pipeline parallelism and would ignore it)")
    return None


def model_parallel_conflict(spec: StageSpec, launch: LaunchSpec) -> tuple[str, str] | None:
    """(field, message) when hybrid_parallel asks to split a model by tensor/pipeline parallelism that the stage
    type's model cannot be split by (no shardformer policy: StageSpec.model_parallel)."""
    if launch.plugin != "hybrid_parallel" or spec.model_parallel:
        return None
    for name in ("tp_size", "pp_size"):
        if getattr(launch, name) != 1:
            return name, (f"{name}={getattr(launch, name)}: stage type {spec.name} cannot split its model by "
                          f"tensor/pipeline parallelism (it has no Colossal-AI shardformer policy); use tp_size: 1 "
                          f"and pp_size: 1 (hybrid_parallel then runs data parallel with ZeRO by zero_stage) or "
                          f"plugin low_level_zero / gemini")
    return None


def _more(exc: pydantic.ValidationError) -> str:
    count = exc.error_count() - 1
    return f" (and {count} more error{'s' if count > 1 else ''})" if count > 0 else ""
