"""Runner and CLI behaviour on the toy stages: caching, why-reruns, selectors, failures, inspection commands."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import write_project_config
from vlflow.cli import main as vlflow_main

PIPELINE = """
name: toy
params:
  text: hello
stages:
  a:
    uses: testing.write
    with: {files: 3, text: "${params.text}"}
  b:
    uses: testing.write
    with: {files: 1, text: other}
  c:
    uses: testing.concat
    inputs: {a: a, b: b}
    with: {suffix: "!"}
  d:
    uses: testing.concat
    inputs: {a: c/out.txt}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(PIPELINE)
    return tmp_path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_then_everything_cached(project, capsys):
    wf = project / "wf.yaml"
    rc, out, _ = run_cli(capsys, "run", wf)
    assert rc == 0, out
    assert out.count("✓ done") == 4
    assert "4 ran, 0 cached" in out
    assert "files=3 bytes=" in out and "chars=" in out  # each stage's returned metrics, under its done line
    rc, out, _ = run_cli(capsys, "run", wf)
    assert rc == 0
    assert out.count("✓ cached") == 4 and "0 ran, 4 cached" in out
    rc, out, _ = run_cli(capsys, "ls", wf, "d")
    assert "out.txt" in out
    # d's output is the concatenation computed through the input sub path
    cache_files = list((project / "cache").rglob("out.txt"))
    texts = {p.read_text() for p in cache_files}
    assert any(t.startswith("hello 0") and t.endswith("!") for t in texts)


def test_plan_explains_why_a_stage_reruns(project, capsys):
    wf = project / "wf.yaml"
    assert run_cli(capsys, "run", wf)[0] == 0
    rc, out, _ = run_cli(capsys, "plan", wf, "--set", "params.text=bye")
    assert rc == 0
    assert "param text" in out and "hello" in out and "bye" in out  # a's changed param, old -> new
    assert "upstream a will run first" in out  # c waits for a
    rc, out, _ = run_cli(capsys, "plan", wf, "--set", "stages.c.with.suffix=bang")
    assert "param suffix" in out
    # after running the change, d reports that its input changed
    assert run_cli(capsys, "run", wf, "--set", "stages.b.with.text=changed", "--until", "c")[0] == 0
    rc, out, _ = run_cli(capsys, "plan", wf, "--set", "stages.b.with.text=changed")
    assert "input a changed" in out


def test_until_only_force(project, capsys):
    wf = project / "wf.yaml"
    rc, out, _ = run_cli(capsys, "run", wf, "--until", "c")
    assert rc == 0 and "3 ran" in out and " d " not in out
    rc, out, _ = run_cli(capsys, "run", wf, "--only", "d")
    assert rc == 0 and "1 ran" in out
    rc, out, _ = run_cli(capsys, "run", wf, "--force", "c")
    assert rc == 0 and "2 ran, 2 cached" in out  # c and its downstream d
    rc, _, err = run_cli(capsys, "run", wf, "--until", "nope")
    assert rc == 2 and "no stage named 'nope'" in err


def test_only_needs_cached_inputs(project, capsys):
    rc, _, err = run_cli(capsys, "run", project / "wf.yaml", "--only", "d")
    assert rc == 2 and "not in the cache" in err


def test_failure_commits_nothing_for_the_failed_stage(project, capsys):
    wf = project / "wf.yaml"
    rc, out, err = run_cli(capsys, "run", wf, "--set", "stages.b.with.fail=true")
    assert rc != 0
    assert "failing on purpose" in err and "stage b" in err
    rc, out, _ = run_cli(capsys, "status", wf, "--set", "stages.b.with.fail=true")
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "cached" in lines["a"] and "missing" in lines["b"] and "missing" in lines["c"]
    # the failed attempt's log is kept for the user
    logs = list((project / "state" / "logs" / "toy").glob("b-*.log"))
    assert logs and "failing on purpose" in logs[0].read_text()


def test_independent_stages_run_concurrently(project, capsys):
    (project / "wf.yaml").write_text(textwrap.dedent("""
        stages:
          x: {uses: testing.write, with: {files: 1, text: x}}
          y: {uses: testing.write, with: {files: 1, text: y}}
    """))
    rc, out, _ = run_cli(capsys, "run", project / "wf.yaml", "--jobs", "2")
    assert rc == 0 and "2 ran" in out
    starts = []
    for manifest in (project / "cache").rglob("manifest.json"):
        m = json.loads(manifest.read_text())["meta"]
        starts.append((m["started"], m["started"] + m["duration"]))
    (s1, e1), (s2, e2) = sorted(starts)
    assert s2 < e1, "the two independent stages did not overlap"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_stages_sharing_one_key_run_once_and_their_output_names_no_stage(project, capsys, jobs):
    (project / "wf.yaml").write_text(textwrap.dedent("""
        stages:
          first: {uses: testing.write, with: {files: 2}}
          second: {uses: testing.write, with: {files: 2}}
    """))
    rc, out, _ = run_cli(capsys, "run", project / "wf.yaml", "--jobs", jobs)
    assert rc == 0, out
    assert out.count("✓ done") == 1 and out.count("✓ cached") == 1  # one key: made once, then reused
    assert "2 stages, 1 ran, 1 cached" in out
    manifests = list((project / "cache").rglob("manifest.json"))
    assert len(manifests) == 1
    data = [p for p in manifests[0].parent.rglob("file_*.txt")]
    assert len(data) == 2
    for path in data:  # the shared artifact may not depend on which stage made it
        text = path.read_text()
        assert "first" not in text and "second" not in text


def test_show_status_graph_gc(project, capsys):
    wf = project / "wf.yaml"
    assert run_cli(capsys, "run", wf)[0] == 0
    rc, out, _ = run_cli(capsys, "show", wf, "a")
    assert rc == 0 and "testing.write" in out and "files" in out and "bytes" in out
    rc, out, _ = run_cli(capsys, "status")
    assert rc == 0 and out.count("testing.") == 4
    rc, out, _ = run_cli(capsys, "graph", wf, "--format", "dot")
    assert '"a" -> "c"' in out and '"c" -> "d"' in out
    rc, out, _ = run_cli(capsys, "graph", wf, "--format", "mermaid")
    assert "a --> c" in out
    rc, out, _ = run_cli(capsys, "graph", wf)
    assert "testing.concat" in out
    # a changed workflow makes the old a/c/d unreachable; gc keeps only what the given workflow reaches
    assert run_cli(capsys, "run", wf, "--set", "params.text=v2")[0] == 0
    rc, out, _ = run_cli(capsys, "gc", wf, "--dry-run")
    assert "would remove 3 artifacts" in out
    rc, out, _ = run_cli(capsys, "gc", wf)
    assert rc == 0
    rc, out, _ = run_cli(capsys, "run", wf)
    assert "0 ran, 4 cached" in out


def test_stages_lists_registered_types_and_params(capsys):
    rc, out, _ = run_cli(capsys, "stages")
    assert rc == 0 and "vilt.pretrain" in out and "arrow.coco_karpathy" in out and "testing.write" in out
    rc, out, _ = run_cli(capsys, "stages", "testing.write")
    assert rc == 0 and "files" in out and "fail" in out
    rc, _, err = run_cli(capsys, "stages", "nope.nope")
    assert rc == 2 and "unknown stage type" in err


def test_validate_prints_resolved_workflow(project, capsys):
    rc, out, _ = run_cli(capsys, "validate", project / "wf.yaml", "--set", "params.text=zz")
    assert rc == 0 and "text: zz" in out


def test_light_commands_do_not_import_torch(project):
    code = textwrap.dedent(f"""
        import sys
        from vlflow.cli import main
        for argv in (["validate", "{project}/wf.yaml"], ["plan", "{project}/wf.yaml"], ["graph", "{project}/wf.yaml"]):
            assert main(argv) == 0
        heavy = [m for m in ("torch", "transformers", "colossalai", "timm") if m in sys.modules]
        assert not heavy, heavy
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(Path(sys.executable).with_name("vlflow")), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "plan" in proc.stdout


def test_noop_run_on_local_cache_imports_neither_fsspec_nor_rich(project, capsys):
    """A no-op run on a local cache whose output is not a terminal reads manifests with open() and prints plain
    lines: fsspec (asyncio) and rich's console and progress display are a quarter of its time."""
    assert run_cli(capsys, "run", project / "wf.yaml")[0] == 0
    code = textwrap.dedent(f"""
        import sys
        from vlflow.cli import main
        assert main(["run", "{project}/wf.yaml"]) == 0
        heavy = ("fsspec", "asyncio", "s3fs", "rich.markup", "rich.console", "rich.progress")
        loaded = [m for m in heavy if m in sys.modules]
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "✓ cached" in proc.stdout and "0 ran" in proc.stdout and "[" not in proc.stdout


def test_malformed_workflows_fail_cleanly_through_the_cli(tmp_path):
    """Every malformed case of test_workflow_errors, through `vlflow validate`/`plan`/`run` in a real process:
    exit code 2, one paragraph naming file:line, no traceback."""
    from tests.engine.workflow.test_workflow_errors import CASES

    lines = []
    for case in CASES:
        folder = tmp_path / case.id
        folder.mkdir()
        (folder / "wf.yaml").write_text(textwrap.dedent(case.text).lstrip("\n"))
        for name, text in case.files.items():
            (folder / name).write_text(textwrap.dedent(text).lstrip("\n"))
        lines.append(json.dumps({"dir": str(folder), "overrides": case.overrides, "env": case.env,
                                 "file": case.file, "line": case.line, "launch": case.launch_defaults}))
    (tmp_path / "cases.jsonl").write_text("\n".join(lines))
    # one interpreter runs main() per case (a fresh process per case would cost ~50 x startup)
    code = textwrap.dedent("""
        import contextlib, io, json, os, sys
        from vlflow.cli import main
        for raw in open(sys.argv[1]):
            case = json.loads(raw)
            if case["launch"]:
                continue  # project launch defaults come from vlflow.toml, covered in test_workflow_errors
            os.environ.update(case["env"])
            err = io.StringIO()
            argv = ["validate", os.path.join(case["dir"], "wf.yaml")]
            for o in case["overrides"]:
                argv += ["--set", o]
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            for k in case["env"]:
                os.environ.pop(k)
            print(json.dumps({"dir": case["dir"], "rc": rc, "err": err.getvalue()}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cases.jsonl")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) >= 50
    for result in results:
        assert result["rc"] == 2, result
        assert result["err"].startswith("error: ") and "Traceback" not in result["err"], result
        assert result["err"].count("\n") <= 2, result  # one paragraph
        assert "wf.yaml:" in result["err"] or "--set" in result["err"] or ".yaml" in result["err"], result


def test_summarize_metrics_flattens_numbers_only():
    from vlflow.plan import summarize_metrics

    metrics = {"head": "rank", "all": {"ir_r1": 0.40399, "tr_r1": 0.62}, "ok": True, "steps": 1000}
    assert summarize_metrics(metrics) == "all.ir_r1=0.404 all.tr_r1=0.62 steps=1000"
    assert summarize_metrics({f"m{i}": i for i in range(12)}, limit=2) == "m0=0 m1=1 …"
    assert summarize_metrics({}) == ""


def test_staging_dirs_of_dead_runs_are_swept_and_live_ones_kept(project, capsys):
    """A killed run leaves its stage's staging dir (partial output); the next run removes it, but not the staging
    dir of a run still going (another workflow or cache may share the state dir), nor one being claimed."""
    import os
    import time

    from vlflow.executors.staging import STAGING_OWNER, claim_staging, sweep_stale_staging

    staging = project / "state" / "staging"
    dead = staging / "a-dead"
    os.close(claim_staging(dead))  # its owner let go: as if killed
    (dead / "output").mkdir()
    (dead / "output" / "partial.arrow").write_bytes(b"x" * 1000)
    live = staging / "b-live"
    os.close(claim_staging(live))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(live / STAGING_OWNER)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        legacy = staging / "c-no-owner-file"  # as older versions left them
        (legacy / "output").mkdir(parents=True)
        claiming = staging / ".d-being-claimed"
        claiming.mkdir()
        assert sweep_stale_staging(project / "state") == [dead, legacy]
        assert sorted(p.name for p in staging.iterdir()) == [".d-being-claimed", "b-live"]
    finally:
        holder.kill()
        holder.wait()
    old = time.time() - 3600
    os.utime(claiming, (old, old))  # a claim this old was cut short by a kill
    rc, out, _ = run_cli(capsys, "run", project / "wf.yaml")  # a run sweeps first, and says so
    assert rc == 0 and "removed 2 staging dir(s) left by killed runs" in out
    assert not list(staging.iterdir())  # and its own staging dirs are gone once committed


def test_manifests_record_the_environment_and_plan_show_run_react_to_a_change(project, capsys, monkeypatch):
    import platform
    from importlib.metadata import version

    monkeypatch.setenv("COLUMNS", "250")
    wf = project / "wf.yaml"
    assert run_cli(capsys, "run", wf)[0] == 0
    manifests = {json.loads(p.read_text())["meta"]["stage"]: p for p in (project / "cache").rglob("manifest.json")}
    env = json.loads(manifests["a"].read_text())["meta"]["environment"]
    cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert env == {"python": platform.python_version(), "torch": version("torch"), "cuda": None if cuda == "None"
                   else cuda, "transformers": version("transformers"), "colossalai": version("colossalai"),
                   "timm": version("timm"), "pyarrow": version("pyarrow"), "tokenizers": version("tokenizers")}

    # the artifact of a was made under another torch (hand-edited: one cannot swap torch inside a test)
    summary = json.loads(manifests["a"].read_text())
    summary["meta"]["environment"]["torch"] = "2.0.0"
    manifests["a"].write_text(json.dumps(summary))
    warning = f"made under another environment: torch 2.0.0 -> {version('torch')}"
    rc, out, _ = run_cli(capsys, "plan", wf)
    assert rc == 0 and warning in " ".join(out.split()) and out.count("cached") == 4
    rc, out, _ = run_cli(capsys, "show", wf, "a")
    assert rc == 0 and warning in " ".join(out.split()) and f"torch {version('torch')}" not in out.split("warning")[0]
    rc, out, _ = run_cli(capsys, "run", wf)
    assert rc == 0 and "0 ran, 4 cached" in out and warning in " ".join(out.split())

    rc, out, _ = run_cli(capsys, "plan", wf, "--rerun-on-env-change")
    assert f"environment changed: torch 2.0.0 -> {version('torch')}" in " ".join(out.split())
    rc, out, _ = run_cli(capsys, "run", wf, "--rerun-on-env-change")
    assert rc == 0 and "1 ran, 3 cached" in out  # a is remade with the same data: c and d stay cached
    assert json.loads(manifests["a"].read_text())["meta"]["environment"]["torch"] == version("torch")
    rc, out, _ = run_cli(capsys, "plan", wf)
    assert "warning" not in out and out.count("cached") == 4
