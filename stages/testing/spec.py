"""Specs of the toy stage types (no torch import: validate/plan must stay fast)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from vlflow.stage import LocalFileParam, Params, StageSpec


class WriteParams(Params):
    files: int = Field(1, ge=0, description="how many files to write")
    size: int = Field(16, ge=0, description="bytes per file (text is repeated/padded to this size)")
    text: str = Field("", description="content seed; empty means 'write'")
    sleep: float = Field(0.0, ge=0, le=60, description="seconds to wait after writing (holds a run open in tests)")
    fail: bool = Field(False, description="raise instead of writing (to test failure handling)")


class ReadParams(Params):
    path: Annotated[str, LocalFileParam()] = Field(description="local file to copy (keyed by its contents)")


class ConcatParams(Params):
    suffix: str = Field("", description="appended to the joined text")


class ClockParams(Params):
    text: str = Field("", description="content of steady.txt; empty means the stage name")


class TrainParams(Params):
    steps: int = Field(20, ge=1)
    lr: float = Field(0.1, gt=0)
    checkpoint_every: int = Field(5, ge=1)
    sleep: float = Field(0.0, ge=0, description="seconds to sleep per step (to test interruption)")
    text: str = Field("", description="reported as its SHA-256 (text_sha256; tests check a secret param reaches the "
                                      "ranks without writing it)")


STAGES = [
    StageSpec(
        name="testing.write",
        entry="vlflow.stages.testing.toy:write",
        params=WriteParams,
        description="Writes `files` text files of `size` bytes.",
    ),
    StageSpec(
        name="testing.read",
        entry="vlflow.stages.testing.toy:read",
        params=ReadParams,
        description="Copies the text of a local file into out.txt (for file-content cache keys).",
    ),
    StageSpec(
        name="testing.concat",
        entry="vlflow.stages.testing.toy:concat",
        params=ConcatParams,
        inputs=("a",),
        optional_inputs=("b",),
        description="Joins the text of all files in inputs a (and b) into out.txt.",
    ),
    StageSpec(
        name="testing.clock",
        entry="vlflow.stages.testing.clock:clock",
        params=ClockParams,
        description="Writes steady.txt and stamp.txt, the time it ran: a planted nondeterministic stage "
                    "(for vlflow check).",
    ),
    StageSpec(
        name="testing.train",
        entry="vlflow.stages.testing.train:train",
        params=TrainParams,
        optional_inputs=("data",),
        distributed=True,
        resumable=True,
        description="Tiny distributed training loop with checkpoints (for launch/resume tests).",
    ),
]
