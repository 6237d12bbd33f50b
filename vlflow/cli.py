"""`vlflow` command line. Keep imports here light: validate/plan/graph must not import torch."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from vlflow.errors import VlflowError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1024, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _add_workflow_args(p: argparse.ArgumentParser, selectors: bool = True) -> None:
    p.add_argument("workflow", type=Path, help="workflow YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set stages.pretrain.with.max_steps=10 (repeatable)")
    if selectors:
        p.add_argument("--until", action="append", default=[], metavar="STAGE",
                       help="run up to STAGE (with its inputs)")
        p.add_argument("--only", action="append", default=[], metavar="STAGE", help="run only STAGE (inputs cached)")
        p.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE and downstream")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="artifact cache URL (any fsspec URL; default from vlflow.toml or VLFLOW_CACHE)")
    p.add_argument("--state-dir", help="local state dir: locks, work dirs, logs (default .vlflow)")


def _add_env_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerun-on-env-change", action="store_true",
                   help="rerun cached stages made under other versions of python, torch, CUDA, transformers, "
                        "colossalai, timm, pyarrow or tokenizers (default: only warn)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlflow", description="Declarative, cached, resumable vision-language "
                                     "training workflows on Colossal-AI.")
    parser.add_argument("--version", action="version", version=f"vlflow {__import__('vlflow').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run what is missing (cached stages are skipped)")
    _add_workflow_args(p)
    _add_cache_args(p)
    p.add_argument("-j", "--jobs", type=_positive_int, help="independent stages to run at once (default from "
                                                             "vlflow.toml)")
    p.add_argument("--lock-timeout", type=_seconds, default=None, help="give up waiting for the cache lock after N s")
    _add_env_arg(p)

    p = sub.add_parser("check", help="rerun cached stages into a scratch dir and compare their data with the cache "
                                     "(exit 1 when a stage does not reproduce)")
    p.add_argument("workflow", type=Path, help="workflow YAML file")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="stages to check (default: every stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set stages.pretrain.with.max_steps=10 (repeatable)")
    p.add_argument("--build", action="store_true", help="first run what is missing (like vlflow run --until STAGE)")
    _add_cache_args(p)

    p = sub.add_parser("plan", help="show, per stage, whether it runs or is cached, and why it reruns")
    _add_workflow_args(p)
    _add_cache_args(p)
    _add_env_arg(p)

    p = sub.add_parser("validate", help="check a workflow and print it resolved")
    _add_workflow_args(p, selectors=False)

    p = sub.add_parser("graph", help="show the stage graph")
    _add_workflow_args(p, selectors=False)
    p.add_argument("--format", choices=["tree", "dot", "mermaid"], default="tree")

    p = sub.add_parser("status", help="what is cached for a workflow (or the whole cache), sizes, when")
    p.add_argument("workflow", type=Path, nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_cache_args(p)

    for name, help_text in (("ls", "list the files of a stage's artifact"),
                            ("show", "show a stage's artifact: params, metrics, files, log tail")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("workflow", type=Path)
        p.add_argument("stage")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        _add_cache_args(p)

    p = sub.add_parser("stages", help="list the registered stage types (built-ins and entry points)")
    p.add_argument("name", nargs="?", help="show one stage type's params")

    p = sub.add_parser("verify", help="re-hash cached artifacts against their recorded file lists "
                                      "(exit 1 when one is damaged)")
    p.add_argument("workflow", type=Path, nargs="?", help="workflow YAML file (default: every artifact in the cache)")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="stages to verify (default: every stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--drop", action="store_true", help="remove damaged artifacts, so that the next run rebuilds them")
    _add_cache_args(p)

    p = sub.add_parser("export", help="copy a stage's committed artifact (or a file/dir in it) to a local dir or "
                                      "any fsspec URL")
    p.add_argument("workflow", type=Path)
    p.add_argument("stage")
    p.add_argument("dest", help="local path or fsspec URL (s3://bucket/dir, ...)")
    p.add_argument("--path", help="a file or directory inside the artifact (default: all of it but _vlflow/)")
    p.add_argument("--link", action="store_true", help="symlink the cache's files instead of copying (local cache "
                                                       "and destination; vlflow gc may remove what they point at)")
    p.add_argument("--force", dest="overwrite", action="store_true", help="overwrite files that exist at DEST")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_cache_args(p)

    p = sub.add_parser("metrics", help="the metrics of stages side by side (every entry of a sweep), with the "
                                       "change against each stage's previous run")
    p.add_argument("workflow", type=Path)
    p.add_argument("stages", nargs="*", metavar="STAGE", help="stages (a sweep's name: all its entries; default: all)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_cache_args(p)

    p = sub.add_parser("path", help="print the local path of a stage's committed artifact (for scripts)")
    p.add_argument("workflow", type=Path)
    p.add_argument("stage")
    p.add_argument("--path", help="a file or directory inside the artifact")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_cache_args(p)

    p = sub.add_parser("gc", help="remove artifacts not reachable from the given workflows")
    p.add_argument("workflows", type=Path, nargs="+")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--min-age", type=_seconds, default=3600.0,
                   help="only remove unreferenced attempt dirs older than this many seconds (a commit in progress "
                        "looks the same; default 3600)")
    _add_cache_args(p)
    return parser


# ---- helpers -------------------------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(highlight=False)


def _config(args, workflow_path: Path | None):
    from vlflow.config import load_config

    return load_config(workflow_path, cache=getattr(args, "cache", None), state_dir=getattr(args, "state_dir", None))


def _load(args, config=None):
    from vlflow.workflow import load_workflow

    config = config or _config(args, args.workflow)
    return load_workflow(args.workflow, overrides=args.overrides, launch_defaults=config.launch,
                         include_paths=config.include_paths, executor_defaults=config.executor), config


def _store(config):
    from vlflow.store import ArtifactStore

    # Local copies of a remote cache's artifacts live in the state dir; what a run commits there stays as that copy.
    return ArtifactStore(config.cache_url, storage_options=config.storage_options or None,
                         local_cache=config.state_dir / "mirror", keep_committed=True)


def _runner(args):
    from vlflow.runner import Runner

    workflow, config = _load(args)
    return Runner(workflow, _store(config), config.state_dir, jobs=getattr(args, "jobs", None) or config.jobs,
                  rerun_on_env_change=getattr(args, "rerun_on_env_change", False)), config


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---- commands ------------------------------------------------------------------------------------------------

def cmd_validate(args) -> int:
    import yaml

    workflow, _ = _load(args)
    sys.stdout.write(yaml.safe_dump(workflow.to_dict(), sort_keys=False))
    print(f"# ok: {len(workflow.stages)} stages", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from rich.table import Table

    runner, _ = _runner(args)
    plans = runner.plan(until=args.until, only=args.only, force=args.force)
    table = Table(title=f"plan: {runner.workflow.name} (cache {runner.store.url})")
    for col in ("stage", "uses", "action", "key", "why"):
        table.add_column(col, overflow="fold", no_wrap=col == "stage")  # a sweep entry's name stays one line
    for plan in plans:
        action = {"cached": "[green]cached[/]", "damaged": "[red]damaged[/]"}.get(plan.action, "[yellow]run[/]")
        why = plan.reasons + [f"[yellow]warning: {w}[/]" for w in plan.warnings]
        table.add_row(plan.name, plan.decl.uses, action, (plan.key or "?")[:12], "\n".join(why))
    _console().print(table)
    return 0


class _RunOutput:
    """What `vlflow run` prints. Plain lines until a stage starts when the output is not a terminal (a script, CI, a
    benchmark): a no-op run then never imports rich's console and progress display, a sixth of its time. On a
    terminal, or once a stage runs, rich prints the same lines in colour with a spinner per running stage."""

    def __init__(self) -> None:
        self.progress = None
        self._active = False
        self._tasks: dict[str, int] = {}
        if getattr(sys.stdout, "isatty", lambda: False)() or os.environ.get("FORCE_COLOR"):
            self._use_rich()

    def _use_rich(self) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=_console(), transient=True)
        if self._active:
            self.progress.start()

    def __enter__(self) -> _RunOutput:
        self._active = True
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        if self.progress is not None:
            self.progress.stop()

    def line(self, markup: Callable[[], str], plain: str) -> None:
        """`markup()` on rich's console, else `plain` (the same text without markup; no rich import to escape it)."""
        if self.progress is None:
            print(plain, flush=True)
        else:
            self.progress.console.print(markup())

    def on_event(self, stage: str, kind: str, text: str) -> None:
        if kind == "log":
            if stage in self._tasks and text.strip():
                from rich.markup import escape

                from vlflow.secrets import mask

                # a log line is text, not markup (`[/x]` in a caption would raise), and may quote a URL
                description = f"[bold]{stage}[/] {escape(mask(text.strip())[:100])}"
                self.progress.update(self._tasks[stage], description=description)
            return
        if kind == "start":
            if self.progress is None:
                self._use_rich()
            self.line(lambda: f"[yellow]▶ run[/]    {stage}  [dim]{_escape(text)}[/]", f"▶ run    {stage}  {text}")
            self._tasks[stage] = self.progress.add_task(f"[bold]{stage}[/]")
        elif kind == "cached":
            self.line(lambda: f"[green]✓ cached[/] {stage}  [dim]{_escape(text)}[/]", f"✓ cached {stage}  {text}")
        elif kind == "done":
            self.line(lambda: f"[green]✓ done[/]   {stage}  [dim]{_escape(text)}[/]", f"✓ done   {stage}  {text}")
        elif kind == "metrics":
            self.line(lambda: f"         [dim]{_escape(text)}[/]", f"         {text}")
        elif kind == "failed":
            self.line(lambda: f"[red]✗ failed[/] {stage}", f"✗ failed {stage}")
        elif kind == "damaged":
            self.line(lambda: f"[red]✗ damaged[/] {stage}  {_escape(text)}", f"✗ damaged {stage}  {text}")
        elif kind == "warning":
            self.line(lambda: f"[yellow]  warning:[/] {_escape(text)}", f"  warning: {text}")
        elif kind == "note":
            self.line(lambda: f"[dim]{_escape(text)}[/]", text)
        if kind in ("done", "failed", "cached") and stage in self._tasks:
            self.progress.remove_task(self._tasks.pop(stage))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def cmd_run(args) -> int:
    import hashlib
    import re

    from vlflow.lock import CacheLock
    from vlflow.runner import Runner

    workflow, config = _load(args)
    store = _store(config)
    output = _RunOutput()
    runner = Runner(workflow, store, config.state_dir, jobs=args.jobs or config.jobs, on_event=output.on_event,
                    rerun_on_env_change=args.rerun_on_env_change)
    config.ensure_state_dir()
    started = time.time()
    # One run of a workflow per cache at a time. A local cache holds the lock file itself, so runs with other state
    # dirs or spellings of its path wait too; for an object store it is per machine (state dir, named by the
    # normalised URL), and the lease locks the runner takes on each stage key keep runs on other machines apart.
    safe_name = re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", workflow.name) is not None
    run_lock = workflow.name if safe_name else hashlib.sha256(workflow.name.encode()).hexdigest()[:16]
    on_wait = lambda msg: output.line(lambda: f"[dim]{_escape(msg)}[/]", msg)  # noqa: E731
    if store.is_local:
        lock = store.lock(f"runs/{run_lock}", label=str(store.url), on_wait=on_wait, timeout=args.lock_timeout)
    else:
        identity = hashlib.sha256(store.identity.encode()).hexdigest()[:12]
        lock = CacheLock(config.state_dir / "locks" / f"{run_lock}-{identity}.lock", name=str(store.url),
                         on_wait=on_wait, timeout=args.lock_timeout)
    with lock:
        with output:
            plans = runner.run(until=args.until, only=args.only, force=args.force)
    ran = sum(1 for p in plans if p.ran)
    summary = f"{len(plans)} stages, {ran} ran, {len(plans) - ran} cached ({time.time() - started:.1f}s)"
    output.line(lambda: f"[bold]{_escape(workflow.name)}[/]: {summary}", f"{workflow.name}: {summary}")
    return 0


def cmd_check(args) -> int:
    from rich.markup import escape

    from vlflow.check import Verdict, check_stages

    console = _console()
    if args.build:  # exactly `vlflow run WORKFLOW --until STAGE...` with the same --set/--cache/--state-dir
        argv = ["run", str(args.workflow)] + [a for stage in args.stages for a in ("--until", stage)]
        argv += [a for override in args.overrides for a in ("--set", override)]
        argv += [a for flag, value in (("--cache", args.cache), ("--state-dir", args.state_dir)) if value
                 for a in (flag, value)]
        cmd_run(build_parser().parse_args(argv))
    runner, _ = _runner(args)

    def on_start(stage: str) -> None:
        console.print(f"[dim]… checking {stage}: rerunning into a scratch dir[/]")

    def on_result(result) -> None:
        if result.verdict is Verdict.REPRODUCED:
            console.print(f"[green]✓ same[/]       {result.stage}  [dim]{result.files} data files, "
                          f"{result.seconds:.1f}s[/]")
        elif result.verdict is Verdict.NOT_CACHED:
            console.print(f"[dim]- not cached {result.stage}: nothing to check ({escape(result.detail)})[/]")
        elif result.verdict is Verdict.FAILED:
            console.print(f"[red]✗ failed[/]     {result.stage}: the rerun failed", markup=True)
            console.print(result.detail, markup=False)
        else:
            first = result.differences[0]
            console.print(f"[red]✗ differs[/]    {result.stage}: {len(result.differences)} of the data files differ; "
                          f"first: {escape(first.describe())}", highlight=False)
            console.print(f"             [dim]{escape(result.detail)}[/]")

    results = check_stages(runner, args.stages, on_start=on_start, on_result=on_result)
    checked = [r for r in results if r.verdict is not Verdict.NOT_CACHED]
    bad = [r.stage for r in checked if not r.ok]
    if not checked:
        console.print(f"[bold]{runner.workflow.name}[/]: nothing to check, no selected stage is cached "
                      "(run it first, or add --build)")
        return 1
    if bad:
        console.print(f"[bold]{runner.workflow.name}[/]: {len(bad)} of {len(checked)} checked stages do not "
                      f"reproduce: {', '.join(bad)}")
        return 1
    console.print(f"[bold]{runner.workflow.name}[/]: all {len(checked)} checked stages reproduce their cached data")
    return 0


def _workflow_artifacts(args):
    runner, config = _runner(args)
    return runner, runner.plan()


def cmd_status(args) -> int:
    from rich.table import Table

    console = _console()
    if args.workflow is None:
        config = _config(args, None)
        store = _store(config)
        table = Table(title=f"cache {store.url}")
        for col in ("key", "workflow", "stage", "uses", "size", "files", "created"):
            table.add_column(col)
        for m in sorted(store.list(), key=lambda m: m.created):
            table.add_row(m.key[:12], m.meta.get("workflow", ""), m.meta.get("stage", ""), m.meta.get("uses", ""),
                          _size(m.size), str(len(m.files)), _when(m.created))
        console.print(table)
        return 0
    args.until, args.only, args.force = [], [], []
    runner, plans = _workflow_artifacts(args)
    table = Table(title=f"{runner.workflow.name} in {runner.store.url}")
    from vlflow.executors.slurm import active_jobs, job_name

    slurm_names = {p.name: job_name(runner.workflow.name, p.name) for p in plans if p.decl.executor.is_slurm}
    on_slurm = active_jobs(list(slurm_names.values()), runner.state_dir)  # being run by a `vlflow run` elsewhere
    for col in ("stage", "uses", "state", "key", "size", "created"):
        table.add_column(col, no_wrap=col == "stage")
    for plan in plans:
        m = plan.manifest
        state = ("[green]cached[/]" if plan.action == "cached" else "[red]damaged[/]" if plan.damaged
                 else "[yellow]missing[/]")
        if plan.action != "cached" and on_slurm.get(slurm_names.get(plan.name, "")):
            state = f"[cyan]on Slurm: {', '.join(on_slurm[slurm_names[plan.name]])}[/]"
        table.add_row(plan.name, plan.decl.uses, state, (plan.key or "?")[:12], _size(m.size) if m else "",
                      _when(m.created) if m else "")
    console.print(table)
    return 0


def _stage_manifest(args):
    args.until, args.only, args.force = [], [], []
    runner, plans = _workflow_artifacts(args)
    for plan in plans:
        if plan.name == args.stage:
            if plan.manifest is None:
                raise VlflowError(f"stage {args.stage} has no cached artifact for the current workflow "
                                  f"({'; '.join(plan.reasons)})")
            return runner, plan.manifest
    from vlflow.export import find_stage

    find_stage(runner.workflow, args.stage)  # names a sweep's entries when given its name
    raise VlflowError(f"no stage named {args.stage!r} in {args.workflow}")


def cmd_ls(args) -> int:
    _, manifest = _stage_manifest(args)
    for entry in manifest.files:
        print(f"{entry.size:>12}  {entry.path}")
    return 0


def cmd_show(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from vlflow.plan import flatten_metrics
    from vlflow.secrets import mask, mask_credentials

    runner, m = _stage_manifest(args)
    console = _console()
    console.print(f"[bold]{args.stage}[/] ({m.meta.get('uses')})  key {m.key}")
    console.print(f"created {_when(m.created)}, {len(m.files)} files, {_size(m.size)}, "
                  f"ran {m.meta.get('duration', 0):.1f}s on {m.meta.get('host', '?')}")
    problems = runner.store.damage(m)
    if problems:
        from vlflow.plan import damage_message

        console.print(f"[red]damaged:[/] {escape(damage_message(m, args.stage, problems))} (vlflow verify "
                      "--drop removes it; the next run that needs it rebuilds it)")
    console.print("params: " + mask(json.dumps(mask_credentials(m.meta.get("params", {})), sort_keys=True)),
                  markup=False)
    recorded = m.meta.get("environment")
    if isinstance(recorded, dict):
        from vlflow.environment import current_environment, describe, environment_changes

        console.print(f"environment: {describe(recorded)}", markup=False)
        changes = environment_changes(recorded, current_environment())
        if changes:
            console.print(f"[yellow]warning:[/] made under another environment: {', '.join(changes)} "
                          "(vlflow run --rerun-on-env-change remakes it)")
    metrics = m.meta.get("metrics") or {}
    if metrics:
        table = Table(title="metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in flatten_metrics(metrics):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(table)
    paths = {e.path for e in m.files}
    if "_vlflow/stage.log" in paths:
        with runner.store.open(m.key, "_vlflow/stage.log") as f:
            tail = f.read().decode(errors="replace").splitlines()[-10:]
        console.print("[dim]log tail:[/]")
        for line in tail:
            console.print("  " + mask(line, assignments=True), markup=False)
    return 0


def cmd_verify(args) -> int:
    """Full re-hash of cached artifacts (a workflow's, or the whole cache's); exit 1 when any is damaged."""
    from rich.markup import escape

    console = _console()
    if args.workflow is None:
        if args.stages:
            raise VlflowError("vlflow verify: name a workflow before its stages (vlflow verify WORKFLOW STAGE ...)")
        store = _store(_config(args, None))
        targets = [(f"{m.meta.get('workflow', '?')}/{m.meta.get('stage', '?')}", m) for m in store.list()]
    else:
        from vlflow.matrix import expand_selection
        from vlflow.runner import Runner

        workflow, config = _load(args)
        store = _store(config)
        args.stages = expand_selection(args.stages, workflow.stages)  # a sweep's name: all its entries
        unknown = [s for s in args.stages if s not in workflow.stages]
        if unknown:
            raise VlflowError(f"no stage named {unknown[0]!r} in {args.workflow} "
                              f"(stages: {', '.join(workflow.stages)})")
        # Without the cheap check, so that damaged artifacts (and what was made from them) are found, then re-hashed.
        plans = Runner(workflow, store, config.state_dir, check_artifacts=False).plan()
        targets = [(p.name, p.manifest) for p in plans
                   if p.manifest is not None and (not args.stages or p.name in args.stages)]
    damaged = 0
    for label, manifest in targets:
        problems = store.verify(manifest)
        if not problems:
            console.print(f"[green]ok[/]       {escape(label)}  {manifest.key[:12]}  {manifest.file_count} files, "
                          f"{_size(manifest.size)}")
            continue
        damaged += 1
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        console.print(f"[red]damaged[/]  {escape(label)}  {manifest.key[:12]}: {escape(problems[0])}{more}")
        for problem in problems[1:]:
            console.print(f"           {problem}", markup=False)
        if args.drop:
            store.remove(manifest.key)
            console.print(f"         dropped {manifest.key[:12]}: the next run rebuilds it")
    console.print(f"verified {len(targets)} artifact(s) in {store.url}: {damaged} damaged")
    return 1 if damaged else 0


def cmd_graph(args) -> int:
    from vlflow.plan import build_graph

    workflow, _ = _load(args)
    graph = build_graph(workflow)
    if args.format == "dot":
        print("digraph vlflow {")
        for name, decl in workflow.stages.items():
            print(f'  "{name}" [label="{name}\\n{decl.uses}"];')
        for a, b in graph.edges:
            print(f'  "{a}" -> "{b}";')
        print("}")
    elif args.format == "mermaid":
        from vlflow.matrix import plain_ids

        ids = plain_ids(workflow.stages)  # mermaid node ids cannot hold a sweep entry's '@', '=', ',' or '.'
        print("graph TD")
        for name, decl in workflow.stages.items():
            print(f'  {ids[name]}["{name}<br/>{decl.uses}"]')
        for a, b in graph.edges:
            print(f"  {ids[a]} --> {ids[b]}")
    else:
        from rich.tree import Tree

        tree = Tree(f"[bold]{workflow.name}[/]")
        shown: set[str] = set()

        def add(node: Tree, name: str) -> None:
            label = f"{name} [dim]({workflow.stages[name].uses})[/]"
            if name in shown:
                node.add(label + " [dim]↑ see above[/]")
                return
            shown.add(name)
            child = node.add(label)
            for succ in sorted(graph.successors(name)):
                add(child, succ)

        for root in [n for n in workflow.stages if graph.in_degree(n) == 0]:
            add(tree, root)
        _console().print(tree)
    return 0


def cmd_gc(args) -> int:
    from vlflow.runner import Runner

    config = _config(args, args.workflows[0])
    store = _store(config)
    keep: set[str] = set()
    for path in args.workflows:
        from vlflow.workflow import load_workflow

        workflow = load_workflow(path, launch_defaults=config.launch, include_paths=config.include_paths,
                                 executor_defaults=config.executor)
        keep |= {p.key for p in Runner(workflow, store, config.state_dir).plan() if p.action == "cached"}
    doomed = [m for m in store.list() if m.key not in keep]
    garbage = store.garbage(min_age=args.min_age)
    if args.dry_run:
        for m in doomed:
            print(f"would remove {m.key[:12]} {m.meta.get('workflow', '')}/{m.meta.get('stage', '')} {_size(m.size)}")
        print(f"would remove {len(doomed)} artifacts and {len(garbage)} unreferenced attempt dirs; keeping {len(keep)}")
        return 0
    count, freed = store.gc(keep, min_age=args.min_age)
    print(f"removed {count} artifacts/attempts, freed {_size(freed)}; kept {len(keep)}")
    return 0


def cmd_stages(args) -> int:
    from rich.table import Table

    from vlflow.stage import get_spec, registry

    console = _console()
    if args.name:
        try:
            spec = get_spec(args.name)
        except KeyError:
            raise VlflowError(f"unknown stage type {args.name!r} (see `vlflow stages`)") from None
        console.print(f"[bold]{spec.name}[/]  {spec.description}")
        console.print(f"inputs: {', '.join(spec.inputs) or '-'}; optional: {', '.join(spec.optional_inputs) or '-'}; "
                      f"distributed: {spec.distributed}; resumable: {spec.resumable}")
        table = Table()
        table.add_column("param", no_wrap=True)
        for column in ("type", "default", "description"):
            table.add_column(column)
        for name, field in spec.params.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            table.add_row(name, getattr(field.annotation, "__name__", str(field.annotation)), default,
                          field.description or "")
        console.print(table)
        return 0
    table = Table()
    table.add_column("stage type", no_wrap=True)
    for column in ("inputs", "kind", "description"):
        table.add_column(column)
    for name, spec in sorted(registry().items()):
        inputs = ", ".join(spec.inputs) + (f" (+{', '.join(spec.optional_inputs)})" if spec.optional_inputs else "")
        kind = " ".join(k for k, on in (("distributed", spec.distributed), ("resumable", spec.resumable)) if on)
        table.add_row(name, inputs or "-", kind, spec.description)
    console.print(table)
    return 0


COMMANDS = {"stages": cmd_stages, "run": cmd_run, "plan": cmd_plan, "validate": cmd_validate, "graph": cmd_graph,
            "status": cmd_status, "ls": cmd_ls, "show": cmd_show, "gc": cmd_gc, "verify": cmd_verify,
            "check": cmd_check}


def _command_in(module: str, name: str):
    """A command implemented in another module, imported only when it runs (keeps `vlflow --help` light)."""
    def command(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)
    return command


COMMANDS.update({"export": _command_in("vlflow.export", "cmd_export"),
                 "path": _command_in("vlflow.export", "cmd_path"),
                 "metrics": _command_in("vlflow.metrics", "cmd_metrics")})


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) stops a run like Ctrl-C: stages are stopped, nothing partial is committed."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _print_error(text: str) -> None:
    """One masked paragraph on stderr (no secret, whatever the error quotes)."""
    from vlflow.secrets import mask

    print(f"error: {mask(text)}", file=sys.stderr, flush=True)


def _stdout_gone() -> int:
    """The reader of stdout went away (`vlflow ls ... | head -1`): stop quietly, like a tool killed by SIGPIPE."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return 141


def main(argv: list[str] | None = None) -> int:
    import os

    for stream in (sys.stdout, sys.stderr):  # text that cannot be encoded is escaped, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    if args.command in ("run", "check"):
        _interrupt_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except VlflowError as exc:
        _print_error(str(exc))
        return 2
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as exc:  # the environment refused something (disk full, permissions): not a bug in vlflow
        if os.environ.get("VLFLOW_DEBUG"):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        _print_error(f"{exc.strerror or exc}{where}")
        return 2
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("VLFLOW_DEBUG"):
            raise
        _print_error(f"internal error: {type(exc).__name__}: {exc} (set VLFLOW_DEBUG=1 for the traceback; "
                     "please report it)")
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing partial was committed; rerun to resume", file=sys.stderr, flush=True)
        if args.command in ("run", "check"):
            import os

            # exit without joining stage threads: their child processes are killed with us (die_with_parent)
            sys.stdout.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
