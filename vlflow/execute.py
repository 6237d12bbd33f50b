"""Runs one non-distributed stage in its own process: `python -m vlflow.execute payload.json`.

A separate process keeps the CLI free of heavy imports, lets independent stages use separate cores, captures
everything the stage prints into its log, and makes a killed stage lose nothing but itself.
The payload (`vlflow.payload.StagePayload`) is written by the runner; the result (metrics) goes to
`<payload>.result.json`.
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from vlflow.errors import VlflowError
from vlflow.payload import StagePayload, result_path, write_result
from vlflow.procs import die_with_parent
from vlflow.stage import StageContext, load_spec

__all__ = ["context_from_payload", "main", "result_path", "write_result"]


def context_from_payload(payload: StagePayload | dict, **distributed) -> StageContext:
    payload = StagePayload.of(payload)
    spec = load_spec(payload.uses, payload.spec_source)  # one spec module, not the registry
    return StageContext(
        stage=payload.stage,
        params=spec.params(**payload.params),
        inputs=dict(payload.inputs),
        output_dir=payload.output_dir,
        work_dir=payload.work_dir,
        launch=payload.launch,
        log=logging.getLogger(f"vlflow.stage.{payload.stage}"),
        **distributed,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    payload_path = Path(argv[0])
    payload = StagePayload.read(payload_path)
    logging.basicConfig(level=payload.log_level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        ctx = context_from_payload(payload)
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = load_spec(payload.uses, payload.spec_source).load()(ctx)
    except VlflowError as exc:  # a user-facing error: one paragraph, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    write_result(payload_path, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
