"""Damaged artifacts are never consumed: the cheap size check in plan/run rebuilds deleted, truncated or extended
files; `vlflow verify` re-hashes (same-size edits too) and can drop what is damaged; a hand-edited manifest whose
attempt points elsewhere is rejected."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_project_config
from vlflow.cli import main as vlflow_main
from vlflow.config import load_config
from vlflow.errors import StageError
from vlflow.runner import Runner
from vlflow.store import ArtifactStore
from vlflow.workflow import load_workflow

PIPELINE = """
name: toy
stages:
  a: {uses: testing.write, with: {files: 3, size: 40, text: hello}}
  c: {uses: testing.concat, inputs: {a: a}, with: {suffix: "!"}}
"""
EXPECTED_C = ("hello 0\n" * 5 + "hello 1\n" * 5 + "hello 2\n" * 5) + "!"


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(PIPELINE)
    return tmp_path


def cli(capsys, *argv) -> tuple[int, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, " ".join((out + err).replace("│", " ").split())  # table cells as words


def artifact_dir(project: Path, stage: str) -> Path:
    """The committed attempt dir of `stage`'s artifact."""
    for path in (project / "cache" / "artifacts").glob("*/manifest.json"):
        summary = json.loads(path.read_text())
        if summary["meta"]["stage"] == stage:
            return path.parent / summary["attempt"]
    raise AssertionError(f"no artifact of {stage}")


def c_output(project: Path) -> str:
    return (artifact_dir(project, "c") / "out.txt").read_text()


@pytest.mark.parametrize("damage,problem", [
    (lambda f: f.unlink(), "file_001.txt is missing"),
    (lambda f: f.write_text("hello"), "file_001.txt has 5 bytes, the manifest says 40"),
    (lambda f: f.write_text(f.read_text() + "more"), "file_001.txt has 44 bytes, the manifest says 40"),
])
def test_cheap_check_rebuilds_deleted_truncated_or_extended_files(project, capsys, damage, problem):
    assert cli(capsys, "run", "wf.yaml")[0] == 0
    a_dir = artifact_dir(project, "a")
    damage(a_dir / "file_001.txt")

    rc, out = cli(capsys, "plan", "wf.yaml")
    assert rc == 0 and "a testing.write damaged" in out and "c testing.concat cached" in out
    assert f"of stage a is damaged: {problem}; vlflow run rebuilds it before a stage uses it" in out
    rc, out = cli(capsys, "status", "wf.yaml")
    assert "a testing.write damaged" in out
    rc, out = cli(capsys, "show", "wf.yaml", "a")
    assert rc == 0 and "damaged: artifact" in out and f"of stage a is damaged: {problem} (vlflow verify" in out

    # c must run (its suffix changed) and consumes a: a is checked first, reported and rebuilt, never consumed
    rc, out = cli(capsys, "run", "wf.yaml", "--set", "stages.c.with.suffix=again")
    assert rc == 0 and "✗ damaged a artifact" in out and f"of stage a is damaged: {problem}; rebuilding it" in out
    assert "2 ran, 0 cached" in out
    assert (artifact_dir(project, "a") / "file_001.txt").read_text() == "hello 1\n" * 5
    assert cli(capsys, "verify", "wf.yaml")[0] == 0
    rc, out = cli(capsys, "plan", "wf.yaml")
    assert "damaged" not in out and out.count(" cached ") == 2


def test_a_no_op_run_reads_manifests_only_and_consumers_rebuild_damaged_inputs(project, capsys):
    assert cli(capsys, "run", "wf.yaml")[0] == 0
    (artifact_dir(project, "a") / "file_000.txt").unlink()
    rc, out = cli(capsys, "run", "wf.yaml")  # nothing consumes a: the no-op run stats no artifact file
    assert rc == 0 and "0 ran, 2 cached" in out
    rc, out = cli(capsys, "run", "wf.yaml", "--force", "c")
    assert rc == 0 and "of stage a is damaged: file_000.txt is missing; rebuilding it" in out
    assert "2 ran, 0 cached" in out and c_output(project) == EXPECTED_C
    rc, out = cli(capsys, "run", "wf.yaml", "--only", "c", "--force", "c")
    assert rc == 0 and "1 ran" in out
    (artifact_dir(project, "a") / "file_000.txt").unlink()
    rc, out = cli(capsys, "run", "wf.yaml", "--only", "c", "--force", "c")  # a is outside the selection
    assert rc == 2 and "of stage a is damaged: file_000.txt is missing; it is outside this run's selection" in out


def test_verify_catches_same_size_edits_and_drop_makes_the_next_run_rebuild(project, capsys):
    assert cli(capsys, "run", "wf.yaml")[0] == 0
    edited = artifact_dir(project, "a") / "file_002.txt"
    edited.write_text(edited.read_text().replace("hello", "HELLO"))  # same size: only a re-hash sees it
    assert "cached" in cli(capsys, "plan", "wf.yaml")[1]

    rc, out = cli(capsys, "verify", "wf.yaml")
    assert rc == 1
    assert "damaged a" in out and "file_002.txt has other contents than committed" in out
    assert "ok c" in out and "verified 2 artifact(s)" in out and "1 damaged" in out
    rc, out = cli(capsys, "verify")  # the whole cache
    assert rc == 1 and "damaged toy/a" in out
    rc, out = cli(capsys, "verify", "wf.yaml", "c")  # only the named stage
    assert rc == 0 and "verified 1 artifact(s)" in out
    rc, out = cli(capsys, "verify", "wf.yaml", "nope")
    assert rc == 2 and "no stage named 'nope'" in out

    rc, out = cli(capsys, "verify", "wf.yaml", "--drop")
    assert rc == 1 and "dropped" in out
    assert cli(capsys, "verify", "wf.yaml")[0] == 0  # a is gone (not damaged), c intact
    rc, out = cli(capsys, "run", "wf.yaml")
    assert rc == 0 and "1 ran, 1 cached" in out
    assert (artifact_dir(project, "a") / "file_002.txt").read_text() == "hello 2\n" * 5


def test_manifest_with_a_relative_attempt_is_never_followed(project, capsys, caplog):
    assert cli(capsys, "run", "wf.yaml")[0] == 0
    # a decoy outside the cache, and a's manifest hand-edited to point there
    decoy = project / "decoy"
    decoy.mkdir()
    for i in range(3):
        (decoy / f"file_{i:03d}.txt").write_text("pwned\n" * 5 + "pwned ")
    a_dir = artifact_dir(project, "a")
    summary_path = a_dir.parent / "manifest.json"
    summary = json.loads(summary_path.read_text())
    summary["attempt"] = "../../../decoy"
    summary_path.write_text(json.dumps(summary))

    rc, out = cli(capsys, "run", "wf.yaml")
    assert rc == 0 and "ignoring corrupt manifest of artifact" in caplog.text
    assert "(attempt: String should match pattern" in caplog.text
    assert "1 ran, 1 cached" in out  # a runs again (its manifest is unusable); c's key is a's data: still valid
    assert c_output(project) == EXPECTED_C
    assert "pwned" not in c_output(project)


def test_damage_after_planning_stops_the_consumer(project, capsys):
    assert cli(capsys, "run", "wf.yaml")[0] == 0
    config = load_config(project / "wf.yaml")
    runner = Runner(load_workflow(project / "wf.yaml"), ArtifactStore(config.cache_url), config.state_dir)
    plans = {p.name: p for p in runner.plan()}
    assert plans["a"].action == "cached"
    (artifact_dir(project, "a") / "file_000.txt").unlink()  # between plan and use
    with pytest.raises(StageError, match=r"of stage a is damaged: file_000.txt is missing; the next vlflow run "
                                         r"rebuilds it"):
        runner._materialize(plans["a"].manifest)
