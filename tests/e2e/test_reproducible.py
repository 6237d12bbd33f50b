"""Same inputs, same bytes: two runs of the tiny workflows from empty caches give every stage the same data digest
(all of its artifact but `_vlflow/`), so a shared workflow gives the same artifacts anywhere and a rerun that
reproduces its data leaves what is downstream cached."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, write_project_config
from vlflow.cli import main as vlflow_main
from vlflow.store import META_DIR, ArtifactStore

WORKFLOWS = REPO_ROOT / "workflows"

# The tiny workflows shrunk to seconds: fewer images; the stages and their code are the real ones.
TINY_VILT = ["--set", "params.images=60", "--set", "params.test_images=10", "--set", "stages.data.with.splits.train=40",
             "--set", "stages.data.with.splits.val=10", "--set", "stages.vqa_arrows.with.rest_val_images=10",
             "--until", "tokenizer", "--until", "vqa_arrows"]
TINY_UNITAB = ["--set", "params.images=60", "--until", "tokenizer"]


def run_from_empty_cache(root: Path, workflow: str, args: list[str], capsys) -> dict[str, tuple[str, str]]:
    """`vlflow run` in a fresh project; {stage: (key, data digest)} of what it committed."""
    root.mkdir()
    write_project_config(root)
    shutil.copy(WORKFLOWS / workflow, root / "wf.yaml")
    rc = vlflow_main(["run", str(root / "wf.yaml"), *args])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    return {m.meta["stage"]: (m.key, m.data_digest) for m in ArtifactStore(str(root / "cache")).list()}


def first_difference(a: Path, b: Path, stage: str, digests_a, digests_b) -> str:
    store_a, store_b = ArtifactStore(str(a / "cache")), ArtifactStore(str(b / "cache"))
    files_a = {e.path: e.sha256 for e in store_a.manifest(digests_a[stage][0]).files if not e.path.startswith(META_DIR)}
    files_b = {e.path: e.sha256 for e in store_b.manifest(digests_b[stage][0]).files if not e.path.startswith(META_DIR)}
    return next((p for p in sorted(set(files_a) | set(files_b)) if files_a.get(p) != files_b.get(p)), "?")


@pytest.mark.parametrize("workflow, args, stages", [
    ("tiny_vilt.yaml", TINY_VILT, {"data", "arrows", "vqa_arrows", "tokenizer"}),
    ("tiny_unitab.yaml", TINY_UNITAB, {"data", "arrows", "tokenizer"}),
])
def test_two_runs_from_empty_caches_give_identical_data(tmp_path, capsys, workflow, args, stages):
    first = run_from_empty_cache(tmp_path / "first", workflow, args, capsys)
    second = run_from_empty_cache(tmp_path / "second", workflow, args, capsys)
    assert set(first) == set(second) == stages
    for stage in sorted(stages):
        assert first[stage][0] == second[stage][0], f"{stage}: the cache keys differ"
        assert first[stage][1] == second[stage][1], (
            f"{stage}: data differs between two runs, first at "
            f"{first_difference(tmp_path / 'first', tmp_path / 'second', stage, first, second)}")
