"""`vlflow metrics WORKFLOW [STAGES...]`: the metrics of stages side by side (every entry of a sweep), with the change
against the previous run of each stage.

A stage's metrics are what it returned (recorded in its manifest's `meta.metrics`; training stages return their last
logged means, the step-by-step log stays in the artifact's `_vlflow/metrics.jsonl`), so the table costs one manifest
read per stage. "Current" is the artifact the workflow names now (the key `vlflow plan` computes); "previous" is the
most recent other artifact committed for the same workflow and stage name (another lr, the run before a code change).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from vlflow.errors import VlflowError
from vlflow.matrix import expand_selection


@dataclass
class StageMetrics:
    stage: str
    key: str | None  # None: nothing committed for the current workflow
    metrics: dict[str, Any] = field(default_factory=dict)  # flat: nested keys joined with '.'
    previous_key: str | None = None
    previous: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why there is no current artifact

    def change(self, metric: str) -> float | None:
        """current - previous, for numbers present in both."""
        now, before = self.metrics.get(metric), self.previous.get(metric)
        if _is_number(now) and _is_number(before):
            return now - before
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(metrics: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def collect(runner, stages: list[str]) -> list[StageMetrics]:
    """Current and previous metrics of `stages` (default: every stage), in workflow order."""
    names = list(runner.workflow.stages)
    wanted = expand_selection(stages, names) if stages else names
    unknown = [s for s in wanted if s not in runner.workflow.stages]
    if unknown:
        raise VlflowError(f"no stage named {unknown[0]!r} in {runner.workflow.path} (stages: {', '.join(names)})")
    plans = {plan.name: plan for plan in runner.plan()}
    # every committed artifact of this workflow's stages, newest first (for "previous")
    history: dict[str, list] = {}
    for manifest in sorted(runner.store.list(), key=lambda m: m.created, reverse=True):
        if manifest.meta.get("workflow") == runner.workflow.name:
            history.setdefault(manifest.meta.get("stage"), []).append(manifest)
    rows = []
    for name in [n for n in names if n in set(wanted)]:
        plan = plans[name]
        current = plan.manifest
        row = StageMetrics(stage=name, key=current.key if current else None,
                           metrics=flatten(current.meta.get("metrics") or {}) if current else {},
                           note="" if current else "; ".join(plan.reasons) or "not run")
        previous = next((m for m in history.get(name, []) if current is None or m.key != current.key), None)
        if previous is not None:
            row.previous_key, row.previous = previous.key, flatten(previous.meta.get("metrics") or {})
        rows.append(row)
    return rows


def metric_names(rows: list[StageMetrics]) -> list[str]:
    """Every metric of the current runs, in first-seen order."""
    return list(dict.fromkeys(metric for row in rows for metric in row.metrics))


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def as_json(rows: list[StageMetrics]) -> str:
    return json.dumps({row.stage: {"key": row.key, "metrics": row.metrics, "previous_key": row.previous_key,
                                   "previous": row.previous,
                                   "change": {m: row.change(m) for m in row.metrics if row.change(m) is not None},
                                   **({"note": row.note} if row.note else {})}
                       for row in rows}, indent=1, default=str)


def as_csv(rows: list[StageMetrics]) -> str:
    """Long format, one line per (stage, metric): easy to load into a data frame and pivot."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stage", "metric", "value", "previous", "change", "key", "previous_key"])
    for row in rows:
        for metric in row.metrics:
            change = row.change(metric)
            writer.writerow([row.stage, metric, row.metrics[metric], row.previous.get(metric, ""),
                             "" if change is None else change, row.key, row.previous_key or ""])
    return buffer.getvalue()


def as_table(rows: list[StageMetrics], title: str):
    """A rich Table: one row per metric, one column per stage (sweep entries side by side); a change against the
    previous run is shown beside the value."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, caption="(±x: change against the previous run of the stage)")
    table.add_column("metric", no_wrap=True)
    for row in rows:
        # a sweep entry's values one per line: a narrow column still tells the entries apart
        header = escape(row.stage).replace("@", "\n@").replace(",", "\n") + ("" if row.key else "\n[dim]not run[/]")
        table.add_column(header, justify="right", overflow="fold")
    for metric in metric_names(rows):
        cells = [escape(metric)]
        for row in rows:
            text = escape(_shown(row.metrics.get(metric)))
            change = row.change(metric)
            if change is not None and change != 0:
                text += f" [dim]({change:+.3g})[/]"
            cells.append(text)
        table.add_row(*cells)
    return table


def cmd_metrics(args) -> int:
    from vlflow.cli import _console, _runner

    runner, _ = _runner(args)
    rows = collect(runner, args.stages)
    if args.format == "json":
        print(as_json(rows))
    elif args.format == "csv":
        print(as_csv(rows), end="")
    else:
        if not any(row.metrics for row in rows):
            missing = [row.stage for row in rows if row.key is None]
            hint = f" ({len(missing)} not run: vlflow run {runner.workflow.path})" if missing else ""
            print(f"no metrics recorded for the selected stages{hint}")
            return 0
        _console().print(as_table(rows, f"metrics: {runner.workflow.name} (cache {runner.store.url})"))
    return 0
