"""Runs one non-distributed stage in its own process: `python -m vlflow.execute payload.json`.

A separate process keeps the CLI free of heavy imports, lets independent stages use separate cores, captures
everything the stage prints into its log, and makes a killed stage lose nothing but itself.
The payload is written by the runner; the result (metrics) goes to `<payload>.result.json`.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from vlflow.errors import VlflowError
from vlflow.procs import die_with_parent
from vlflow.stage import LaunchSpec, StageContext, load_spec


def context_from_payload(payload: dict, **distributed) -> StageContext:
    spec = load_spec(payload["uses"], payload.get("spec_source"))  # one spec module, not the registry
    launch = payload.get("launch")
    return StageContext(
        stage=payload["stage"],
        params=spec.params(**payload["params"]),
        inputs={name: Path(p) for name, p in payload["inputs"].items()},
        output_dir=Path(payload["output_dir"]),
        work_dir=Path(payload["work_dir"]) if payload.get("work_dir") else None,
        launch=LaunchSpec(**launch) if launch else None,
        log=logging.getLogger(f"vlflow.stage.{payload['stage']}"),
        **distributed,
    )


def result_path(payload_path: Path) -> Path:
    return payload_path.with_name(payload_path.name + ".result.json")


def write_result(payload_path: Path, metrics: dict | None) -> None:
    tmp = result_path(payload_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics or {}, default=float))
    tmp.replace(result_path(payload_path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    payload_path = Path(argv[0])
    payload = json.loads(payload_path.read_text())
    logging.basicConfig(level=payload.get("log_level", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        ctx = context_from_payload(payload)
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = load_spec(payload["uses"], payload.get("spec_source")).load()(ctx)
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
