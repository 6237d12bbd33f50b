"""Workflow files: YAML -> validated `Workflow`, with `file:line` + dotted field path in every error.

One module per job, imports running downward only:
- `yaml_lines`: YAML with the location of every value (parse, merge),
- `interpolate`: `${params.x}`, `${env.X:-d}` (and `${stages.S.output}`, defined in vlflow.refs),
- `model`: `InputRef`, `StageDecl`, `Workflow`,
- `validate`, `messages`: checks beyond pydantic's, and how errors word values,
- `includes`: a file with its `extends:`/`include:` files merged in (allowed trees, bounds),
- `overrides`: `--set PATH=VALUE`,
- `loader`: the phases in order, sweeps, validation against stage specs (`load_workflow`).
"""
from vlflow.workflow.includes import MAX_FILES_READ, MAX_INCLUDE_DEPTH
from vlflow.workflow.loader import load_workflow
from vlflow.workflow.model import InputRef, StageDecl, Workflow
from vlflow.workflow.validate import bool_for_number, launch_conflict

__all__ = ["InputRef", "StageDecl", "Workflow", "load_workflow", "bool_for_number", "launch_conflict",
           "MAX_FILES_READ", "MAX_INCLUDE_DEPTH"]
