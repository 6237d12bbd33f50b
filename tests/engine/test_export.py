"""`vlflow export` and `vlflow path`: the current committed artifact of a stage, copied (hash-checked), linked, or
located; refusals for what is not there, overwrites, remote caches."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import fsspec
import pytest

from tests.conftest import write_project_config
from vlflow.cli import main as vlflow_main

WORKFLOW = """
name: exp
stages:
  data:
    uses: testing.write
    with: {files: 3, size: 10, text: "${env.EXPORT_TEXT:-one}"}
  sweep:
    uses: testing.write
    matrix: {n: [1, 2]}
    with: {files: "${matrix.n}"}
  join:
    uses: testing.concat
    inputs: {a: data}
"""


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def project(tmp_path, monkeypatch, capsys) -> Path:
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(textwrap.dedent(WORKFLOW))
    rc, out, err = run_cli(capsys, "run", "wf.yaml", "--until", "data", "--until", "sweep")
    assert rc == 0, out + err
    return tmp_path


def test_path_prints_the_committed_artifact_dir_and_files_in_it(project, capsys):
    rc, out, _ = run_cli(capsys, "path", "wf.yaml", "data")
    root = Path(out.strip())
    assert rc == 0 and root.is_dir() and root.is_relative_to(project / "cache" / "artifacts")
    assert sorted(p.name for p in root.iterdir()) == ["_vlflow", "file_000.txt", "file_001.txt", "file_002.txt"]
    rc, out, _ = run_cli(capsys, "path", "wf.yaml", "data", "--path", "file_001.txt")
    assert rc == 0 and Path(out.strip()) == root / "file_001.txt"
    rc, out, _ = run_cli(capsys, "path", "wf.yaml", "sweep@n=2")
    assert rc == 0 and len(list(Path(out.strip()).glob("file_*"))) == 2


@pytest.mark.parametrize("argv, message", [
    (["path", "wf.yaml", "join"], "stage join has no committed artifact for the current workflow"),
    (["path", "wf.yaml", "sweep"], "stage 'sweep' is a sweep of 2 entries; name one: sweep@n=1, sweep@n=2"),
    (["path", "wf.yaml", "nope"], "no stage named 'nope'"),
    (["path", "wf.yaml", "data", "--path", "../x"], "expected a plain relative path"),
    (["export", "wf.yaml", "data", "out", "--path", "missing.txt"], "no such file or directory in the artifact"),
])
def test_errors_are_one_line_with_exit_code_2(project, capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_changed_workflow_has_no_current_artifact(project, capsys, monkeypatch):
    monkeypatch.setenv("EXPORT_TEXT", "two")  # another key: the committed artifact is an older run's
    rc, _, err = run_cli(capsys, "path", "wf.yaml", "data")
    assert rc == 2 and "no committed artifact" in err and 'param text: "one" -> "two"' in err


def test_export_copies_the_data_and_refuses_to_overwrite_without_force(project, capsys):
    rc, out, _ = run_cli(capsys, "export", "wf.yaml", "data", "out")
    assert rc == 0 and "copied 3 file(s)" in out
    root = Path(run_cli(capsys, "path", "wf.yaml", "data")[1].strip())
    assert sorted(p.name for p in (project / "out").iterdir()) == ["file_000.txt", "file_001.txt", "file_002.txt"]
    assert (project / "out" / "file_001.txt").read_bytes() == (root / "file_001.txt").read_bytes()
    (project / "out" / "file_001.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "export", "wf.yaml", "data", "out")
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (project / "out" / "file_001.txt").read_text() == "mine"  # untouched
    rc, _, _ = run_cli(capsys, "export", "wf.yaml", "data", "out", "--force")
    assert rc == 0 and (project / "out" / "file_001.txt").read_bytes() == (root / "file_001.txt").read_bytes()
    # one file, to a file name or into a directory; the runner's bookkeeping when asked for
    rc, _, _ = run_cli(capsys, "export", "wf.yaml", "data", "single.txt", "--path", "file_002.txt")
    assert rc == 0 and (project / "single.txt").read_bytes() == (root / "file_002.txt").read_bytes()
    rc, _, _ = run_cli(capsys, "export", "wf.yaml", "data", "out", "--path", "_vlflow")
    assert rc == 0 and (project / "out" / "stage.log").is_file()


def test_export_links_on_a_local_cache(project, capsys):
    rc, out, _ = run_cli(capsys, "export", "wf.yaml", "data", "linked", "--link")
    assert rc == 0 and "linked 3 file(s)" in out
    root = Path(run_cli(capsys, "path", "wf.yaml", "data")[1].strip())
    link = project / "linked" / "file_000.txt"
    assert link.is_symlink() and Path(os.readlink(link)) == root / "file_000.txt"


def test_export_to_an_fsspec_url(project, capsys):
    rc, out, _ = run_cli(capsys, "export", "wf.yaml", "data", "memory://exported/data")
    assert rc == 0 and "memory://exported/data" in out
    fs = fsspec.filesystem("memory")
    assert sorted(fs.ls("/exported/data", detail=False)) == [f"/exported/data/file_00{i}.txt" for i in range(3)]
    rc, _, err = run_cli(capsys, "export", "wf.yaml", "data", "memory://exported/data2", "--link")
    assert rc == 2 and "--link needs a local cache and a local destination" in err


def test_export_refuses_bytes_that_differ_from_the_manifest(project, capsys):
    root = Path(run_cli(capsys, "path", "wf.yaml", "data")[1].strip())
    target = root / "file_000.txt"
    os.chmod(target, 0o644)
    target.write_bytes(b"X" * target.stat().st_size)  # same size: only hashing finds it
    rc, _, err = run_cli(capsys, "export", "wf.yaml", "data", "out")
    assert rc == 2 and "does not match its manifest" in err
    assert not (project / "out" / "file_000.txt").exists() and not list((project / "out").glob("*partial"))


def test_remote_cache_has_no_local_path_but_exports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wf.yaml").write_text(textwrap.dedent(WORKFLOW))
    cache = ["--cache", f"memory://vlflow-export-test-{os.getpid()}", "--state-dir", str(tmp_path / "state")]
    assert run_cli(capsys, "run", "wf.yaml", "--until", "data", *cache)[0] == 0
    rc, _, err = run_cli(capsys, "path", "wf.yaml", "data", *cache)
    assert rc == 2 and "is not a local directory" in err and "vlflow export" in err
    rc, _, _ = run_cli(capsys, "export", "wf.yaml", "data", "out", *cache)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"file_00{i}.txt" for i in range(3)]
