"""Checks pydantic would not make on its own: booleans given for numbers, launch settings a plugin would ignore."""
from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import pydantic

from vlflow.stage import LaunchSpec, StageSpec


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
