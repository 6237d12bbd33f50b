"""`--set PATH=VALUE`: overrides applied to the merged document before interpolation (values parsed as YAML)."""
from __future__ import annotations

from typing import Any

from vlflow.errors import WorkflowError
from vlflow.workflow.messages import printable, suggest, type_name
from vlflow.workflow.yaml_lines import MAX_YAML_DEPTH, Location, Locations, drop_under, mark_all, parse_yaml


def apply_overrides(document: dict, overrides: list[str], locations: Locations) -> None:
    """Apply `--set PATH=VALUE` to the merged document; `--set ...` is where each value it sets was written."""
    for override in overrides:
        origin = f"--set {printable(override)}"
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
                value, _ = parse_yaml(text, origin)
            except WorkflowError as exc:
                raise WorkflowError(f"cannot parse value {text!r}: {exc.message}", file=origin,
                                    field=key) from None
        if parts[0] == "params" and len(parts) > 1:
            check_param_exists(document.get("params"), parts, origin, key)
        target = document
        for depth, part in enumerate(parts[:-1]):
            if part not in target or target[part] is None:
                target[part] = {}
                locations[tuple(parts[: depth + 1])] = Location(origin, None)
            if not isinstance(target[part], dict):
                where = ".".join(parts[: depth + 1])
                raise WorkflowError(f"{where} is {type_name(target[part])}, not a mapping",
                                    file=origin, field=key)
            target = target[part]
        target[parts[-1]] = value
        path = tuple(parts)
        drop_under(locations, path)
        locations[path] = Location(origin, None)
        if isinstance(value, (dict, list)):  # everything under it comes from the override too
            mark_all(value, path, locations, Location(origin, None))


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
            hint = suggest(part, known) if known else ""
            raise WorkflowError(f"the workflow defines no {where}.{part}{hint}; --set only changes params "
                                "the workflow defines (add it under `params:` first)", file=origin, field=key)
        current = current[part]
