"""Implementations of testing.write and testing.concat (testing.train lives in train.py)."""
from __future__ import annotations

from pathlib import Path

from vlflow.errors import StageError
from vlflow.stage import StageContext


def write(ctx: StageContext) -> dict:
    params = ctx.params
    if params.fail:
        raise StageError("failing on purpose (fail: true)", field=f"stages.{ctx.stage}.with.fail")
    seed = params.text or ctx.stage
    total = 0
    for index in range(params.files):
        line = f"{seed} {index}\n"
        content = (line * (params.size // len(line) + 1))[: params.size]
        (ctx.output_dir / f"file_{index:03d}.txt").write_text(content)
        total += len(content)
    return {"files": params.files, "bytes": total}


def _text_of(path: Path) -> str:
    if path.is_file():
        return path.read_text()
    # `_vlflow/` holds the runner's log and metrics of the upstream run, not its data
    return "".join(p.read_text() for p in sorted(path.rglob("*")) if p.is_file() and "_vlflow" not in p.relative_to(path).parts)


def concat(ctx: StageContext) -> dict:
    parts = [_text_of(ctx.inputs["a"])]
    if "b" in ctx.inputs:
        parts.append(_text_of(ctx.inputs["b"]))
    text = "".join(parts) + ctx.params.suffix
    (ctx.output_dir / "out.txt").write_text(text)
    return {"chars": len(text)}
