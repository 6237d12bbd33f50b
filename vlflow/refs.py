"""The `${stages.S.output}` reference, defined once: how it is written, found and replaced.

In a stage's `with` it adds an edge to S and is kept verbatim through loading (and in cache keys); the runner replaces
it with the local path of S's artifact just before the stage runs. Standard library only: the loader, the sweep
expansion and the planner all use it.
"""
from __future__ import annotations

import re
from typing import Any, Callable

STAGE_REF_NAME = r"[A-Za-z_][A-Za-z0-9_-]*(?:@[A-Za-z0-9_.+=,-]+)?"  # a sweep entry (`finetune@lr=0.1`) too
STAGE_OUTPUT_EXPR = re.compile(r"stages\.(" + STAGE_REF_NAME + r")\.output")  # inside `${...}`
STAGE_OUTPUT_TEXT = re.compile(r"\$\{stages\.(" + STAGE_REF_NAME + r")\.output\}")  # anywhere in a string


def stage_ref(stage: str) -> str:
    """`${stages.STAGE.output}`."""
    return f"${{stages.{stage}.output}}"


def collect_stage_outputs(value: Any, found: set[str]) -> None:
    """Add to `found` every stage whose output `value` (a JSON-like value) references."""
    if isinstance(value, str):
        found.update(STAGE_OUTPUT_TEXT.findall(value))
    elif isinstance(value, dict):
        for item in value.values():
            collect_stage_outputs(item, found)
    elif isinstance(value, list):
        for item in value:
            collect_stage_outputs(item, found)


def referenced_stages(value: Any) -> set[str]:
    found: set[str] = set()
    collect_stage_outputs(value, found)
    return found


def substitute_stage_outputs(value: Any, path_of: Callable[[str], str]) -> Any:
    """`value` with every `${stages.S.output}` replaced by `path_of(S)`."""
    if isinstance(value, str):
        return STAGE_OUTPUT_TEXT.sub(lambda m: path_of(m.group(1)), value)
    if isinstance(value, dict):
        return {k: substitute_stage_outputs(v, path_of) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_stage_outputs(v, path_of) for v in value]
    return value


def with_stage_outputs_as_paths(value: Any) -> Any:
    """`value` with every ${stages.S.output} replaced by an absolute path, as the runner will do (to validate it)."""
    return substitute_stage_outputs(value, lambda stage: f"/vlflow/artifacts/{stage}")
