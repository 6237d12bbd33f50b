"""`${params.x}`, `${env.NAME:-default}` and `${stages.S.output}` in workflow values (and back, for dumping).

A value that is exactly one `${...}` keeps its type; `$${` is a literal `${`. `${stages.S.output}` is checked and kept
verbatim (vlflow.refs): the runner replaces it with S's local artifact path.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from vlflow.errors import WorkflowError
from vlflow.refs import STAGE_OUTPUT_EXPR, STAGE_OUTPUT_TEXT, stage_ref
from vlflow.secrets import MASK, Masker, looks_secret
from vlflow.workflow.messages import suggest, type_name
from vlflow.workflow.yaml_lines import KeyPath, Location, Locations, dotted

MAX_REFERENCE_CHAIN = 32  # ${params.a} -> ${params.b} -> ...

# `$${` is an escaped literal `${`; `${...}` is a reference; a `${` that is neither is unterminated.
_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_ENV = re.compile(r"env\.([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


class Resolver:
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
        return WorkflowError(message, file=file, line=line, field=dotted(path))

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
                if STAGE_OUTPUT_TEXT.match(text, match.start() + 1):
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
            match = STAGE_OUTPUT_EXPR.fullmatch(expression)
            if match is None:
                raise self.fail(f"malformed reference ${{{body}}} (expected ${{stages.NAME.output}})", path)
            if not allow_stages:
                raise self.fail(f"${{{body}}} is only allowed in a stage's `with` block", path)
            stage = match.group(1)
            if stage == self.current_stage:
                raise self.fail(f"stage {stage!r} depends on itself", path)
            if stage not in self.stage_names:
                raise self.fail(f"${{{body}}} names no stage of this workflow{suggest(stage, self.stage_names)}",
                                path)
            return stage_ref(stage)  # kept for the runner
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
                raise self.fail(f"unknown reference ${{{body}}}: no {dotted(current_path)}.{key}"
                                f"{suggest(key, list(current))}", path)
            else:
                raise self.fail(f"unknown reference ${{{body}}}: {dotted(current_path)} is "
                                f"{type_name(current)}, it has no {key!r}", path)
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
            raise self.fail("reference cycle: " + " -> ".join(dotted(p) for p in cycle), self.in_progress[0])
        if len(self.in_progress) >= MAX_REFERENCE_CHAIN:
            first, last = dotted(self.in_progress[0]), dotted(key)
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


def escape_for_output(value: Any, masker: Masker) -> Any:
    """Mask secrets and re-escape literal `${` so the dumped document loads back to the same workflow."""
    if isinstance(value, dict):
        return {k: escape_for_output(v, masker) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_for_output(v, masker) for v in value]
    if isinstance(value, str):
        value = masker.mask(value)
    elif value is not None and not isinstance(value, bool) and masker.contains(str(value)):
        return MASK  # e.g. a numeric secret that a param coerced to an int
    if isinstance(value, str) and "${" in value:
        parts = STAGE_OUTPUT_TEXT.split(value)  # stage references stay; every other `${` is literal text
        for index in range(0, len(parts), 2):
            parts[index] = parts[index].replace("${", "$${")
        for index in range(1, len(parts), 2):
            parts[index] = f"${{stages.{parts[index]}.output}}"
        return "".join(parts)
    return value
