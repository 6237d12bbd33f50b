"""The contract between the engine and the stage library.

A stage type is described by a light `StageSpec` (name, pydantic params model, declared inputs, entry point as a
"module:function" string). Specs are importable without torch so that `vlflow validate`/`plan` stay fast; the stage
code itself is imported only when the stage runs.

A stage function receives a `StageContext` and writes its outputs into `ctx.output_dir`. It knows nothing about
caching, manifests or object stores: the runner materialises inputs as local directories and commits the output.
"""
from __future__ import annotations

import functools
import importlib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from vlflow.code_digest import CodeDigest


class Params(BaseModel):
    """Base for stage parameter models: unknown keys are errors, values are validated and coerced.

    A model's validator is built when it first validates (`defer_build`), not when its spec module is imported: the
    runner imports every registered spec module (dozens of models) and validates the few its workflow uses. The stage
    server builds them all once, before it forks (`build_params_models`)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


def build_params_models(specs: Iterable["StageSpec"]) -> None:
    """Build the validators of these specs' params models now (each is otherwise built on its first validation)."""
    for spec in specs:
        spec.params.model_rebuild(force=True)


@dataclass(frozen=True)
class LocalFileParam:
    """Marks a string param that may name a local file or directory whose contents decide the stage's result
    (weights, a checkpoint, a tokenizer): `path: Annotated[str | None, LocalFileParam()] = Field(...)`. The planner
    keys such a param by the contents of the path it names when that exists locally (a hub name or other URL stays
    keyed by its string), so replacing the file at the same path reruns the stage (vlflow.file_digest)."""


def local_file_params(model: type[BaseModel], values: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(name, value) of every string `LocalFileParam` field in `values` (a params dump of `model`), nested models and
    lists of them included: `backbone_weights`, `files[0].url`."""
    if not isinstance(values, dict):
        return
    marked, nested = _marked_fields(model)
    for name in marked:
        if isinstance(values.get(name), str):
            yield f"{prefix}{name}", values[name]
    for name, inner in nested.items():
        value = values.get(name)
        if isinstance(value, list):
            for index, item in enumerate(value):
                yield from local_file_params(inner, item, f"{prefix}{name}[{index}].")
        else:
            yield from local_file_params(inner, value, f"{prefix}{name}.")


@functools.cache
def _marked_fields(model: type[BaseModel]) -> tuple[tuple[str, ...], dict[str, type[BaseModel]]]:
    marked = tuple(name for name, info in model.model_fields.items()
                   if any(isinstance(m, LocalFileParam) for m in info.metadata))
    nested = {name: inner for name, info in model.model_fields.items()
              if (inner := _inner_model(info.annotation)) is not None}
    return marked, nested


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The params model inside `Model`, `Model | None` or `list[Model]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (inner := _inner_model(arg)) is not None:
            return inner
    return None


class LaunchSpec(BaseModel):
    """How a distributed stage is launched (the `launch:` block of a stage, defaults from vlflow.toml)."""

    model_config = ConfigDict(extra="forbid")

    launcher: Literal["torchrun", "mpirun", "slurm"] = "torchrun"
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(0, ge=0, le=65535, description="0 picks a free port on single-node runs")
    plugin: Literal["torch_ddp", "low_level_zero", "gemini", "hybrid_parallel"] = "torch_ddp"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    tp_size: int = Field(1, ge=1, description="hybrid_parallel only")
    pp_size: int = Field(1, ge=1, description="hybrid_parallel only")
    zero_stage: int = Field(1, ge=0, le=2, description="low_level_zero / hybrid_parallel")
    extra_args: list[str] = Field(default_factory=list, description="appended to the launcher command line")


@dataclass(frozen=True)
class StageSpec:
    """Declaration of one stage type."""

    name: str
    entry: str  # "package.module:function", imported lazily
    params: type[Params] = Params
    inputs: tuple[str, ...] = ()  # required input names
    optional_inputs: tuple[str, ...] = ()
    version: str = "1"  # bump to invalidate caches on a semantic change the source hash would miss
    distributed: bool = False  # run under the launcher (torchrun + colossalai.launch_from_torch)
    resumable: bool = False  # gets a persistent work dir that survives failures
    # its model can be split by tensor/pipeline parallelism (hybrid_parallel tp_size/pp_size > 1): it has a
    # Colossal-AI shardformer policy. Without one, only tp_size = pp_size = 1 (data parallel) is accepted.
    model_parallel: bool = False
    description: str = ""

    def load(self) -> Callable[["StageContext"], dict | None]:
        module_name, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module_name), func)

    def code(self) -> "CodeDigest":
        """The source files this stage runs (entry module, what it imports inside vlflow and its own package,
        the engine code hosting it) with their digests; see `vlflow.code_digest`. Nothing is imported."""
        from vlflow.code_digest import code_digest

        return code_digest(self.entry.partition(":")[0], self.distributed, f"{self.name}\0{self.version}")

    def code_digest(self) -> str:
        """sha256 over the code this stage runs (see `code`) and `version`."""
        return self.code().digest


@dataclass
class StageContext:
    """Everything a running stage may use."""

    stage: str  # the stage's name in the workflow
    params: Any  # the validated params model instance (attribute access: ctx.params.max_steps)
    inputs: dict[str, Path]  # input name -> local path (directory, or file when the input names a sub path)
    output_dir: Path  # write outputs here; committed by the runner when the stage returns
    work_dir: Path | None = None  # persistent across failed attempts (resumable stages only)
    launch: LaunchSpec | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vlflow.stage"))
    # Filled in by the distributed worker (vlflow.launch.worker) for distributed stages:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    booster: Any = None  # colossalai.booster.Booster built from `launch` (by `booster_factory`, on first use)
    plugin: Any = None
    booster_factory: Any = None  # max_norm -> (booster, plugin); training_booster (stages/common/fit.py) calls it once

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------------------
# Registry: the "vlflow.stages" entry-point group (vlflow's own stage packages register there too, in pyproject.toml).

_registry: dict[str, StageSpec] | None = None
_sources: dict[str, str] = {}  # stage type -> where its spec is defined: an entry point's "module:attr"


def _collect(obj: Any, out: dict[str, StageSpec], origin: str) -> None:
    specs = obj if isinstance(obj, (list, tuple)) else [obj]
    for spec in specs:
        if not isinstance(spec, StageSpec):
            raise TypeError(f"{origin}: expected StageSpec, got {type(spec).__name__}")
        if spec.name in out:
            raise ValueError(f"stage type {spec.name!r} registered twice ({origin})")
        out[spec.name] = spec


def registry() -> dict[str, StageSpec]:
    """All known stage types by name (loaded once), from every installed package's "vlflow.stages" entry points."""
    global _registry
    if _registry is None:
        from importlib.metadata import entry_points

        found: dict[str, StageSpec] = {}
        for ep in sorted(entry_points(group="vlflow.stages"), key=lambda ep: (ep.dist.name != "vlflow", ep.name)):
            _collect(ep.load(), found, f"entry point {ep.name} ({ep.value})")
            _sources.update({name: ep.value for name in found if name not in _sources})
        _registry = found
    return _registry


def spec_source(name: str) -> str | None:
    """Where stage type `name` is defined ("module" holding STAGES, or an entry point's "module:attr"), for
    `load_spec` in a stage process."""
    registry()
    return _sources.get(name)


def load_spec(name: str, source: str | None) -> StageSpec:
    """The spec of stage type `name`, importing only `source` (from `spec_source`) when given: a stage process needs
    one spec, not every package's (nor the entry-point scan). Falls back to the whole registry."""
    if _registry is not None and name in _registry:  # loaded already (the stage server loads it before it forks)
        return _registry[name]
    if source:
        module_name, _, attr = source.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in (attr or "STAGES").split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            return get_spec(name)
        found: dict[str, StageSpec] = {}
        _collect(target, found, source)
        if name in found:
            return found[name]
    return get_spec(name)


def get_spec(name: str) -> StageSpec:
    specs = registry()
    if name not in specs:
        raise KeyError(name)
    return specs[name]
