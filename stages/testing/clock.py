"""`testing.clock`: a planted nondeterministic stage. Its data carries the time it ran, so no rerun reproduces it;
`vlflow check` must find it and name the file."""
from __future__ import annotations

import time

from vlflow.stage import StageContext


def clock(ctx: StageContext) -> dict:
    (ctx.output_dir / "steady.txt").write_text(f"{ctx.params.text or ctx.stage}\n")  # the same on every run
    (ctx.output_dir / "stamp.txt").write_text(f"{time.time_ns()}\n")  # never the same twice
    return {"files": 2}
