"""Params naming a local file (weights, checkpoints, tokenizers) are keyed by the file's contents, memoised by stat."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import write_project_config
from vlflow import file_digest, plan
from vlflow.cli import main as vlflow_main
from vlflow.file_digest import FileDigests, local_path
from vlflow.stage import get_spec, local_file_params

WORKFLOW = """
name: files
stages:
  a:
    uses: testing.read
    with: {path: "${params.seed}"}
params: {seed: seed.txt}
"""
HOUR_AGO_NS = 3600 * 10**9


def age(path: Path, by_ns: int = HOUR_AGO_NS) -> None:
    """Set `path`'s mtime in the past (a weights file is seldom written the second before a run)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - by_ns))


@pytest.fixture
def no_racy_window(monkeypatch):
    """Memoise files however recently changed: a test's files are seconds old (the window has a test of its own)."""
    monkeypatch.setattr(file_digest, "RACY_WINDOW_NS", -10**15)


@pytest.fixture
def project(tmp_path: Path, monkeypatch, no_racy_window) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # plan's table keeps a reason on one line
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    (tmp_path / "seed.txt").write_text("first")
    age(tmp_path / "seed.txt")
    return tmp_path


@pytest.fixture
def planners(monkeypatch) -> list[FileDigests]:
    """The FileDigests of every planner made from here on (what each run hashed)."""
    made = []

    class Recorded(FileDigests):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(plan, "FileDigests", Recorded)
    return made


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, " ".join((out + err).split())


def test_changed_contents_rerun_touch_does_not_and_noop_reads_nothing(project, capsys, planners):
    wf, seed = project / "wf.yaml", project / "seed.txt"
    rc, out = run_cli(capsys, "run", wf)
    assert rc == 0 and "1 ran" in out, out
    assert [p.name for p in planners[-1].hashed] == ["seed.txt"]
    assert (project / "state" / file_digest.MEMO_FILE).is_file()

    memo = (project / "state" / file_digest.MEMO_FILE).stat()
    rc, out = run_cli(capsys, "run", wf)  # no-op: the memo's stat signature matches, the file is not read
    assert rc == 0 and "1 cached" in out and planners[-1].hashed == []
    after = (project / "state" / file_digest.MEMO_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (memo.st_ino, memo.st_mtime_ns)  # nor the memo rewritten

    mtime = seed.stat().st_mtime_ns
    os.utime(seed, ns=(mtime, mtime + 10**9))  # touched: same bytes, new mtime -> hashed once, still cached
    rc, out = run_cli(capsys, "run", wf)
    assert rc == 0 and "1 cached" in out and len(planners[-1].hashed) == 1
    rc, out = run_cli(capsys, "run", wf)
    assert rc == 0 and "1 cached" in out and planners[-1].hashed == []

    seed.write_text("other")  # same size, same path: only the contents changed
    os.utime(seed, ns=(mtime, mtime))  # even with the old mtime back (ctime and the memo's digest check still see it)
    rc, out = run_cli(capsys, "plan", wf)
    assert rc == 0 and "param path: contents of seed.txt changed" in out, out
    rc, out = run_cli(capsys, "run", wf)
    assert rc == 0 and "1 ran" in out
    rc, out = run_cli(capsys, "export", wf, "a", project / "out")
    assert rc == 0 and (project / "out" / "out.txt").read_text() == "other"


def test_hub_names_and_missing_paths_stay_keyed_by_their_string(project, capsys):
    from vlflow.config import load_config
    from vlflow.runner import Runner
    from vlflow.store import ArtifactStore
    from vlflow.workflow import load_workflow

    def components(value: str) -> dict:
        workflow = load_workflow(project / "wf.yaml", overrides=[f"params.seed={value}"])
        config = load_config(project)
        return Runner(workflow, ArtifactStore(config.cache_url), config.state_dir).plan()[0].components

    hub = components("bert-base-uncased")
    assert "files" not in hub and hub["params"]["path"] == "bert-base-uncased"
    assert "files" not in components("missing/weights.pth")  # the stage's own validation reports it when it runs
    local = components("seed.txt")
    digest = "sha256:" + hashlib.sha256(b"first").hexdigest()
    assert local["files"] == {"path": {"path": "seed.txt", "digest": digest}}
    assert components(f"file://{project / 'seed.txt'}")["files"]["path"]["digest"] == digest


def test_marked_params_of_the_stage_library():
    marked = {name: dict(local_file_params(get_spec(name).params, values)) for name, values in (
        ("unitab.pretrain", {"backbone_weights": "w.pth", "init_checkpoint": None, "text_encoder": "roberta-base",
                             "backbone": "resnet101"}),
        ("vilt.pretrain", {"vit_init": "jx.pth", "tokenizer": "tok/", "init_from": None, "lr": 1.0}),
        ("download", {"files": [{"url": "a.tar"}, {"url": "https://x/b.tar"}]}),
    )}
    assert marked == {
        "unitab.pretrain": {"backbone_weights": "w.pth", "text_encoder": "roberta-base"},
        "vilt.pretrain": {"vit_init": "jx.pth", "tokenizer": "tok/"},
        "download": {"files[0].url": "a.tar", "files[1].url": "https://x/b.tar"},
    }


def test_tree_digest_follows_contents_and_names(tmp_path, no_racy_window):
    digests = FileDigests(tmp_path / "memo.json")
    tree = tmp_path / "tok"
    (tree / "sub").mkdir(parents=True)
    (tree / "vocab.txt").write_text("a\nb\n")
    (tree / "sub" / "config.json").write_text("{}")
    first = digests.digest(tree, "with.tokenizer")
    assert first.startswith("tree:") and digests.digest(tree, "with.tokenizer") == first
    copy = tmp_path / "copy"
    (copy / "sub").mkdir(parents=True)
    (copy / "sub" / "config.json").write_text("{}")
    (copy / "vocab.txt").write_text("a\nb\n")
    assert digests.digest(copy, "x") == first  # contents and relative names, not the location or write order
    (copy / "vocab.txt").rename(copy / "vocab2.txt")
    assert digests.digest(copy, "x") != first
    (tree / "vocab.txt").write_text("a\nc\n")
    assert digests.digest(tree, "x") != first
    assert local_path(str(tree)) == tree and local_path("bert-base-uncased") is None
    assert local_path("s3://bucket/w.pth") is None


def test_memo_never_serves_changed_contents(tmp_path, no_racy_window):
    weights, memo = tmp_path / "w.pth", tmp_path / "memo.json"
    weights.write_bytes(b"1" * 64)
    age(weights)
    assert FileDigests(memo).digest(weights, "w") == "sha256:" + hashlib.sha256(b"1" * 64).hexdigest()
    reader = FileDigests(memo)
    reader.digest(weights, "w")
    assert reader.hashed == []  # a memo hit across instances (runs)
    # replaced by a file of the same size and mtime: a new inode (and ctime) -> hashed again
    mtime = weights.stat().st_mtime_ns
    (tmp_path / "new").write_bytes(b"2" * 64)
    os.utime(tmp_path / "new", ns=(mtime, mtime))
    os.replace(tmp_path / "new", weights)
    reader = FileDigests(memo)
    assert reader.digest(weights, "w") == "sha256:" + hashlib.sha256(b"2" * 64).hexdigest()
    assert len(reader.hashed) == 1
    memo.write_text("{not json")  # a damaged memo is only a cache: rebuilt by hashing
    assert FileDigests(memo).digest(weights, "w").endswith(hashlib.sha256(b"2" * 64).hexdigest())


def test_recently_changed_files_are_not_memoised(tmp_path):
    """A file written within the racy window could change again in the same timestamp tick, leaving size, mtime and
    ctime as they were: it is hashed on every run until it is older than the window."""
    weights, memo = tmp_path / "w.pth", tmp_path / "memo.json"
    weights.write_bytes(b"fresh")
    FileDigests(memo).digest(weights, "w")
    reader = FileDigests(memo)
    reader.digest(weights, "w")
    assert len(reader.hashed) == 1


def test_unreadable_file_is_one_clear_error(tmp_path, monkeypatch):
    from vlflow.errors import VlflowError

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")

    def denied(path, *args, **kwargs):  # chmod 0 is no barrier to root, who runs these tests in containers
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(file_digest, "open", denied, raising=False)
    with pytest.raises(VlflowError, match=r"with\.backbone_weights: cannot read .*w\.pth: Permission denied"):
        FileDigests(None).digest(weights, "stages.a.with.backbone_weights")
