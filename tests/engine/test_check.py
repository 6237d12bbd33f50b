"""`vlflow check`: reruns cached stages into scratch dirs, compares data files, never touches the cache."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import TEST_DATA, write_project_config
from vlflow.check import compare
from vlflow.cli import main as vlflow_main
from vlflow.store import FileEntry

WORKFLOWS = TEST_DATA / "workflows"

PIPELINE = """
name: checked
stages:
  source: {uses: testing.write, with: {files: 3, size: 40}}
  joined: {uses: testing.concat, inputs: {a: source}, with: {suffix: "!"}}
  clock: {uses: testing.clock}
  after_clock: {uses: testing.concat, inputs: {a: clock/steady.txt}}
  train:
    uses: testing.train
    inputs: {data: joined}
    with: {steps: 6, checkpoint_every: 2}
    launch: {nproc_per_node: 2}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(PIPELINE)
    return tmp_path


def vlflow(capsys, *argv) -> tuple[int, str]:
    rc = vlflow_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content digest: what a check must leave exactly as it was."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.dist
def test_check_finds_the_planted_nondeterministic_stage_and_leaves_the_cache_alone(project, capsys):
    rc, out = vlflow(capsys, "run", "wf.yaml")
    assert rc == 0, out
    before = snapshot(project / "cache")

    rc, out = vlflow(capsys, "check", "wf.yaml", "--state-dir", "scratch_state")
    assert rc == 1, out
    assert "differs" in out and "clock: 1 of the data files differ; first: stamp.txt: cached" in out
    for stage in ("source", "joined", "after_clock", "train"):  # deterministic, the distributed one included
        assert f"same       {stage}" in out or f"same {stage}" in " ".join(out.split()), out
    assert "do not reproduce: clock" in out

    assert snapshot(project / "cache") == before  # nothing committed, no ref written
    kept = project / "scratch_state" / "check" / "checked" / "clock"
    assert (kept / "steady.txt").is_file() and (kept / "stamp.txt").is_file()  # the differing rerun, to diff
    assert not list((project / "scratch_state" / "staging").iterdir())  # scratch dirs removed
    assert not (project / "scratch_state" / "work").exists()  # train's checkpoints went to its scratch dir
    assert not (project / "scratch_state" / "locks").exists()  # a check only reads: it takes no run lock


def test_check_passes_on_deterministic_stages(project, capsys):
    assert vlflow(capsys, "run", "wf.yaml", "--until", "after_clock", "--until", "joined")[0] == 0
    rc, out = vlflow(capsys, "check", "wf.yaml", "source", "joined", "after_clock")
    assert rc == 0, out
    assert "all 3 checked stages reproduce" in out
    assert "clock" not in out.replace("after_clock", "")  # only the named stages were rerun


def test_uncached_stages_have_nothing_to_check_until_built(project, capsys):
    rc, out = vlflow(capsys, "check", "wf.yaml", "joined")
    assert rc == 1 and "nothing to check" in out and "not cached joined" in " ".join(out.split()), out
    assert not (project / "cache" / "artifacts").exists() or not any((project / "cache" / "artifacts").iterdir())

    rc, out = vlflow(capsys, "check", "wf.yaml", "joined", "--build")
    assert rc == 0, out
    assert "all 1 checked stages reproduce" in out
    rc, out = vlflow(capsys, "check", "wf.yaml", "no_such_stage")
    assert rc == 2 and "no_such_stage" in out


def test_compare_names_differences_in_path_order_and_ignores_the_runner_metadata():
    cached = [FileEntry("b.txt", 3, "1" * 64), FileEntry("a.txt", 2, "2" * 64),
              FileEntry("_vlflow/stage.log", 9, "3" * 64),
              FileEntry("gone.txt", 1, "4" * 64)]
    rerun = [FileEntry("a.txt", 2, "2" * 64), FileEntry("b.txt", 4, "5" * 64),
             FileEntry("_vlflow/stage.log", 7, "6" * 64),
             FileEntry("new.txt", 1, "7" * 64)]
    differences = compare(cached, rerun)
    assert [d.path for d in differences] == ["b.txt", "gone.txt", "new.txt"]
    assert differences[0].describe() == "b.txt: cached 3 B, sha256 111111111111, rerun 4 B, sha256 555555555555"
    assert "not written by the rerun" in differences[1].describe()
    assert "not in the cache" in differences[2].describe()
    assert compare(cached[:2], list(reversed(cached[:2]))) == []


def test_tokenizer_and_arrows_of_a_small_vilt_workflow_reproduce(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    shutil.copy(WORKFLOWS / "small_vilt.yaml", tmp_path / "wf.yaml")
    rc, out = vlflow(capsys, "check", "wf.yaml", "data", "arrows", "tokenizer", "--build")
    assert rc == 0, out
    assert "all 3 checked stages reproduce" in out


@pytest.mark.dist
def test_a_training_stage_reproduces_under_check(tmp_path, monkeypatch, capsys):
    """vilt.pretrain (2 gloo ranks, 4 steps) rerun by `vlflow check`: same weights, same data files."""
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    shutil.copy(WORKFLOWS / "small_vilt.yaml", tmp_path / "wf.yaml")
    rc, out = vlflow(capsys, "check", "wf.yaml", "pretrain", "--build", "--set", "stages.pretrain.with.max_steps=4")
    assert rc == 0, out
    assert "same       pretrain" in out and "all 1 checked stages reproduce" in out


def test_a_rerun_that_fails_is_reported_and_fails_the_check(project, capsys):
    (project / "wf.yaml").write_text("name: failing\nstages:\n  source: {uses: testing.write, with: {files: 2}}\n"
                                     "  picked: {uses: testing.concat, inputs: {a: source/file_001.txt}}\n")
    assert vlflow(capsys, "run", "wf.yaml")[0] == 0
    # the cached input file vanishes (a damaged local cache): the rerun of `picked` cannot start
    next((project / "cache").rglob("file_001.txt")).unlink()
    rc, out = vlflow(capsys, "check", "wf.yaml", "picked")
    assert rc == 1, out
    text = " ".join(out.split())
    assert "failed picked: the rerun failed" in text and "file_001.txt" in text, out  # what is missing, named
    assert "do not reproduce: picked" in out
