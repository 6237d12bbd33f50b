"""Implementations of testing.write, testing.read and testing.concat (testing.train lives in train.py)."""
from __future__ import annotations

import time
from pathlib import Path

from vlflow.errors import StageError
from vlflow.stage import StageContext


def write(ctx: StageContext) -> dict:
    params = ctx.params
    if params.fail:
        raise StageError("failing on purpose (fail: true)", field=f"stages.{ctx.stage}.with.fail")
    seed = params.text or "write"  # never the stage's name: two stages with one key share one artifact
    total = 0
    for index in range(params.files):
        line = f"{seed} {index}\n"
        content = (line * (params.size // len(line) + 1))[: params.size]
        (ctx.output_dir / f"file_{index:03d}.txt").write_text(content)
        total += len(content)
    time.sleep(params.sleep)
    return {"files": params.files, "bytes": total}


def read(ctx: StageContext) -> dict:
    text = Path(ctx.params.path).read_text()
    (ctx.output_dir / "out.txt").write_text(text)
    return {"chars": len(text)}


def data_files(path: Path) -> list[Path]:
    """An input's files in a stable order: `path` itself, or the files under it but `_vlflow/` (the runner's log and
    metrics of the upstream run, not its data)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and "_vlflow" not in p.relative_to(path).parts)


def _text_of(path: Path) -> str:
    return "".join(p.read_text() for p in data_files(path))


def concat(ctx: StageContext) -> dict:
    parts = [_text_of(ctx.inputs["a"])]
    if "b" in ctx.inputs:
        parts.append(_text_of(ctx.inputs["b"]))
    text = "".join(parts) + ctx.params.suffix
    (ctx.output_dir / "out.txt").write_text(text)
    return {"chars": len(text)}
