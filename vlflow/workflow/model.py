"""The validated workflow: `Workflow` of `StageDecl`s whose inputs are `InputRef`s (what the loader returns)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlflow.executors.spec import ExecutorSpec
from vlflow.refs import collect_stage_outputs
from vlflow.secrets import Masker, mask_credentials
from vlflow.stage import LaunchSpec
from vlflow.workflow.interpolate import escape_for_output


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
        collect_stage_outputs(self.params, found)
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
        return escape_for_output(mask_credentials(document), self.masker())
