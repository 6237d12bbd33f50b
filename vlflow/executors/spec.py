"""The `executor:` block of a stage: where a stage's process runs (this machine, or a Slurm batch job).

Light on imports: the workflow loader and vlflow.toml reader validate against it. Where a stage runs does not change
what it makes, so nothing here is part of a cache key (see vlflow.plan.Planner.key_components).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Slurm's --time formats: minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:|&()!*\[\]-]+$")  # partition/account/qos/constraint expressions


class ExecutorSpec(BaseModel):
    """Where a stage runs. `local`: a child process of `vlflow run` (the default). `slurm`: a batch job submitted
    with sbatch; `vlflow run` stays on the login node, waits for it and commits its output."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["local", "slurm"] = "local"
    partition: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0: ask for no GPUs (--gpus-per-node is left out)")
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = Field(None, description="per node, Slurm's --mem syntax: 4000, 16G")
    time: str | None = Field(None, description="time limit, Slurm's --time syntax: 30, 2:00:00, 1-12:00:00")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_args: list[str] = Field(default_factory=list, description="further sbatch options, e.g. --exclusive")
    shared_dirs: list[str] = Field(
        default_factory=list, description="local directories the login node and the compute nodes both see "
        "(the cache and state dirs must be below one, or the cache an object store URL)")
    max_resubmits: int = Field(3, ge=0, le=100, description="resubmissions after preemption or node failure")
    signal_seconds: int = Field(
        120, ge=0, le=3600, description="SIGUSR1 this long before the time limit (--signal): the stage checkpoints")
    controller_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="how long a Slurm command may take before the controller is unreachable")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_TIME.match(value):
            raise ValueError("time must be in Slurm's --time syntax (minutes, H:M:S or D-H:M:S)")
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_MEM.match(value):
            raise ValueError("mem must be in Slurm's --mem syntax: a number with an optional K/M/G/T suffix")
        return value

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_NAME.match(value):
            raise ValueError("must be a Slurm name or expression without spaces or shell characters")
        return value

    @property
    def is_slurm(self) -> bool:
        return self.type == "slurm"
