"""`replace: true` and `delete: true` on stages of a file that extends (or includes) another."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vlflow.errors import WorkflowError
from vlflow.workflow import load_workflow

REPO = REPO_ROOT

BASE = """
name: base
stages:
  data:
    uses: testing.write
    with: {files: 3, size: 64, text: base}
  other: {uses: testing.write}
  join:
    uses: testing.concat
    inputs: {a: data, b: other}
  report:
    uses: testing.write
    needs: [join]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "base.yaml", BASE)


def test_without_replace_a_stage_is_deep_merged(tmp_path, base):
    wf = load_workflow(write(tmp_path, "wf.yaml", """
        extends: base.yaml
        stages:
          data: {with: {files: 1}}
    """))
    assert wf.stages["data"].params["files"] == 1 and wf.stages["data"].params["size"] == 64  # kept from base


def test_replace_swaps_the_whole_stage(tmp_path, base):
    wf = load_workflow(write(tmp_path, "wf.yaml", """
        extends: base.yaml
        stages:
          data:
            replace: true
            uses: testing.clock
            with: {text: mine}
    """))
    data = wf.stages["data"]
    assert data.uses == "testing.clock" and data.params == {"text": "mine"}  # nothing of the base's `with`
    assert data.file == str(tmp_path / "wf.yaml") and data.line == 3
    assert wf.stages["join"].inputs["a"].stage == "data"  # the rest still uses it under its name


def test_delete_removes_stages_and_replace_false_is_a_plain_merge(tmp_path, base):
    wf = load_workflow(write(tmp_path, "wf.yaml", """
        extends: base.yaml
        stages:
          report: {delete: true}
          join: {delete: true}
          data: {replace: false, with: {files: 2}}
    """))
    assert list(wf.stages) == ["data", "other"]
    assert wf.stages["data"].params["size"] == 64


@pytest.mark.parametrize("stages, line, field, message", [
    ("  nope: {replace: true, uses: testing.write}", 3, "stages.nope.replace",
     "cannot replace stage 'nope': no file this one extends or includes defines it"),
    ("  nope: {delete: true}", 3, "stages.nope.delete", "cannot delete stage 'nope'"),
    ("  data: {delete: true, with: {files: 1}}", 3, "stages.data.with", "`delete: true` stands alone"),
    ("  data: {delete: yes please}", 3, "stages.data.delete", "expected true or false"),
    ("  data: {delete: true, replace: true}", 3, "stages.data", "either replaced or deleted"),
])
def test_replace_and_delete_errors_name_the_line(tmp_path, base, stages, line, field, message):
    path = write(tmp_path, "wf.yaml", "extends: base.yaml\nstages:\n" + stages + "\n")
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    error = info.value
    assert (error.file, error.line, error.field) == (str(path), line, field), str(error)
    assert message in error.message


def test_deleting_a_stage_others_use_names_the_user(tmp_path, base):
    path = write(tmp_path, "wf.yaml", """
        extends: base.yaml
        stages:
          data: {delete: true}
    """)
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    error = info.value
    assert (error.file, error.line, error.field) == (str(tmp_path / "base.yaml"), 9, "stages.join.inputs.a")
    assert f"uses stage 'data', which {path}:3 deletes" in error.message
    # a reference from the file's own stages counts too (here through ${stages.X.output})
    path = write(tmp_path, "wf2.yaml", """
        extends: base.yaml
        stages:
          report: {delete: true}
          late: {uses: testing.write, with: {text: "${stages.report.output}"}}
    """)
    with pytest.raises(WorkflowError, match="stage 'late' uses stage 'report'") as info:
        load_workflow(path)
    assert (info.value.line, info.value.field) == (4, "stages.late.with.text")


def test_a_shared_file_can_swap_its_download_for_a_synthetic_copy(tmp_path):
    """The issue's case: coco_vilt's `data` stage replaced wholesale, the rest of the file kept."""
    (tmp_path / "coco_vilt.yaml").write_text((REPO / "workflows" / "coco_vilt.yaml").read_text())
    base = load_workflow(tmp_path / "coco_vilt.yaml")
    first = next(iter(base.stages))
    wf = load_workflow(write(tmp_path, "local.yaml", f"""
        extends: coco_vilt.yaml
        stages:
          {first}:
            replace: true
            uses: synthetic.coco
            with: {{num_images: 20}}
    """))
    assert wf.stages[first].uses == "synthetic.coco" and wf.stages[first].params["num_images"] == 20
    assert set(wf.stages) == set(base.stages)
