"""Sweeps (`matrix:`): expansion into named entries, follow/gather wiring, --set, errors with file:line, and one short
end-to-end run on the toy stages (upstream once, entries shared from the cache)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, write_project_config
from vlflow.cli import main as vlflow_main
from vlflow.errors import WorkflowError
from vlflow.matrix import expand_selection, plain_ids, storage_name
from vlflow.workflow import load_workflow

REPO = REPO_ROOT

SWEEP = """
name: sweep
params: {lrs: [0.1, 0.2]}
stages:
  data: {uses: testing.write, with: {files: 1, text: base}}
  train:
    uses: testing.write
    needs: [data]
    matrix: {lr: "${params.lrs}", seed: [0, 1]}
    with: {text: "lr ${matrix.lr} seed ${matrix.seed}", files: "${matrix.seed}"}
  evaluate:
    uses: testing.concat
    inputs: {a: train, b: data}
    with: {suffix: "-${matrix.lr}"}
  report:
    uses: testing.concat
    inputs: {a: data}
    needs: {train: all}
"""
ENTRIES = ["lr=0.1,seed=0", "lr=0.1,seed=1", "lr=0.2,seed=0", "lr=0.2,seed=1"]


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_matrix_expands_into_named_entries_that_downstream_follows_or_gathers(tmp_path):
    wf = load_workflow(write(tmp_path, SWEEP))
    assert list(wf.stages) == ["data", *(f"train@{e}" for e in ENTRIES), *(f"evaluate@{e}" for e in ENTRIES),
                               "report"]
    train = wf.stages["train@lr=0.2,seed=1"]
    assert train.params["text"] == "lr 0.2 seed 1" and train.params["files"] == 1  # whole value keeps its type
    assert train.needs == ["data"]
    evaluate = wf.stages["evaluate@lr=0.2,seed=0"]
    assert evaluate.inputs["a"].stage == "train@lr=0.2,seed=0" and evaluate.inputs["b"].stage == "data"
    assert evaluate.params["suffix"] == "-0.2"  # a followed sweep's keys are usable downstream
    report = wf.stages["report"]
    assert report.needs == [f"train@{e}" for e in ENTRIES]
    assert report.deps() == {"data", *(f"train@{e}" for e in ENTRIES)}
    # errors about an entry point at the stage it came from
    assert train.line == wf.stages["train@lr=0.1,seed=0"].line == 5


def test_stage_output_references_follow_the_sweep_and_set_overrides_a_matrix(tmp_path):
    path = write(tmp_path, """
        stages:
          train: {uses: testing.write, matrix: {n: [1, 2]}, with: {files: "${matrix.n}"}}
          use: {uses: testing.write, with: {text: "from ${stages.train.output}"}}
    """)
    wf = load_workflow(path)
    assert wf.stages["use@n=2"].params["text"] == "from ${stages.train@n=2.output}"
    assert wf.stages["use@n=2"].deps() == {"train@n=2"}
    wf = load_workflow(path, overrides=["stages.train.matrix.n=[3, 4, 5]"])
    assert [n for n in wf.stages if n.startswith("train")] == ["train@n=3", "train@n=4", "train@n=5"]
    assert wf.stages["train@n=5"].params["files"] == 5


def test_entries_with_values_that_are_not_plain_scalars_are_named_by_position(tmp_path):
    path = write(tmp_path, """
        stages:
          w:
            uses: testing.write
            matrix: {size: [{n: 4}, {n: 8}], text: ["a b", c]}
            with: {text: "${matrix.text}"}
    """)
    wf = load_workflow(path)
    assert list(wf.stages) == ["w@size=0,text=0", "w@size=0,text=1", "w@size=1,text=0", "w@size=1,text=1"]
    assert wf.stages["w@size=1,text=0"].params["text"] == "a b"


@pytest.mark.parametrize("body, line, field, message", [
    ("matrix: {lr: []}", 5, "stages.train.matrix.lr", "empty list"),
    ("matrix: []", 5, "stages.train.matrix", "expected a mapping"),
    ("matrix: {lr: 0.1}", 5, "stages.train.matrix.lr", "expected a list"),
    ("matrix: {lr: [0.0001, 1e-4]}", 5, "stages.train.matrix.lr.1", "both name the entry train@lr=0.0001"),
    ("matrix: {lr: [1]}\n    with: {text: '${matrix.rate}'}", 6, "stages.train.with.text",
     "unknown matrix key 'rate'"),
    ("with: {text: '${matrix.rate}'}", 5, "stages.train.with.text", "has no `matrix:`"),
    ("matrix: {lr: [1]}\n    needs: ['${matrix.lr}']", 6, "stages.train.needs.0", "not allowed in `needs`"),
    ("needs: {data: each}", 5, "stages.train.needs.data", "expected `all`"),
])
def test_bad_matrices_name_file_line_and_field(tmp_path, body, line, field, message):
    path = write(tmp_path, "stages:\n  data: {uses: testing.write}\n  train:\n    uses: testing.write\n    "
                 + body + "\n")
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    error = info.value
    assert (error.file, error.line, error.field) == (str(path), line, field), str(error)
    assert message in error.message


def test_sweep_conflicts_are_errors(tmp_path):
    clash = write(tmp_path, """
        stages:
          "w@n=1": {uses: testing.write}
          w: {uses: testing.write, matrix: {n: [1, 2]}}
    """)
    with pytest.raises(WorkflowError, match="also a declared stage") as info:
        load_workflow(clash)
    assert info.value.line == 3
    gather_and_input = write(tmp_path, """
        stages:
          w: {uses: testing.write, matrix: {n: [1, 2]}}
          c: {uses: testing.concat, inputs: {a: w}, needs: {w: all}}
    """, "g.yaml")
    with pytest.raises(WorkflowError, match="gathers 'w'.*name one entry instead, e.g. w@n=1"):
        load_workflow(gather_and_input)
    redefined = write(tmp_path, """
        stages:
          w: {uses: testing.write, matrix: {n: [1, 2]}}
          c: {uses: testing.concat, inputs: {a: w}, matrix: {n: [3]}}
    """, "r.yaml")
    with pytest.raises(WorkflowError, match="already swept by upstream stage 'w'"):
        load_workflow(redefined)
    one_entry = write(tmp_path, """
        stages:
          w: {uses: testing.write, matrix: {n: [1, 2]}}
          c: {uses: testing.concat, inputs: {a: "w@n=2"}, needs: {w: all}}
    """, "e.yaml")
    assert load_workflow(one_entry).stages["c"].inputs["a"].stage == "w@n=2"  # an entry may be named directly


def test_names_for_selectors_refs_and_graphs():
    known = ["data", "train@lr=0.1", "train@lr=0.2", "report"]
    assert expand_selection(["train", "data", "nope"], known) == ["train@lr=0.1", "train@lr=0.2", "data", "nope"]
    assert storage_name("data") == "data"
    assert storage_name("train@lr=0.1").startswith("train.") and storage_name("train@lr=0.1") != storage_name(
        "train@lr=0.2")
    ids = plain_ids(known)
    assert ids["data"] == "data" and len(set(ids.values())) == 4 and all("@" not in i for i in ids.values())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sweep_end_to_end_shares_upstream_and_reuses_cached_entries(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    wf = write(tmp_path, SWEEP)
    rc, out, err = run_cli(capsys, "run", wf)
    assert rc == 0, out + err
    assert "10 stages, 10 ran" in out
    rc, out, _ = run_cli(capsys, "ls", wf, "evaluate@lr=0.2,seed=1")
    assert rc == 0 and "out.txt" in out
    # one more lr: only its entries run; data, the other entries and report (ordering-only needs) are cached
    rc, out, _ = run_cli(capsys, "run", wf, "--set", "params.lrs=[0.1, 0.2, 0.3]")
    assert rc == 0, out
    ran = sorted(line.split()[2] for line in out.splitlines() if line.startswith("▶ run"))
    assert ran == sorted([f"evaluate@lr=0.3,seed={s}" for s in (0, 1)] + [f"train@lr=0.3,seed={s}" for s in (0, 1)])
    assert "14 stages, 4 ran, 10 cached" in out
    # a declared name selects every entry
    rc, out, _ = run_cli(capsys, "run", wf, "--force", "evaluate")
    assert rc == 0 and "4 ran, 6 cached" in out
    rc, out, _ = run_cli(capsys, "status", wf)
    assert rc == 0 and out.count("cached") == 10 and "train@lr=0.1,seed=1" in out
    # a bad matrix from the command line: one error line, no traceback
    rc, out, err = run_cli(capsys, "plan", wf, "--set", "stages.train.matrix.seed=[]")
    assert rc == 2 and err.startswith("error: ") and "empty list" in err and "Traceback" not in err


def test_tiny_vilt_sweep_plans_one_pretrain_and_one_finetune_and_evaluation_per_lr(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    wf = load_workflow(REPO / "workflows" / "tiny_vilt_sweep.yaml")
    names = list(wf.stages)
    assert names.count("pretrain") == 1
    assert [n for n in names if n.startswith("finetune@")] == ["finetune@lr=0.0005", "finetune@lr=0.001"]
    assert wf.stages["finetune@lr=0.001"].params["lr"] == 0.001
    assert wf.stages["evaluate@lr=0.001"].inputs["model"].stage == "finetune@lr=0.001"
    base = load_workflow(REPO / "workflows" / "tiny_vilt.yaml")
    assert wf.stages["finetune@lr=0.0005"].params == base.stages["finetune"].params  # same key: shared cache
    rc, out, err = run_cli(capsys, "plan", REPO / "workflows" / "tiny_vilt_sweep.yaml")
    assert rc == 0, err
    flat = out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "evaluate@lr=0.001" in flat and "finetune@lr=0.0005" in flat


def test_check_and_verify_take_a_sweeps_name_for_all_its_entries_show_lists_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    wf = write(tmp_path, """
        stages:
          w: {uses: testing.write, matrix: {n: [1, 2]}, with: {files: "${matrix.n}"}}
    """)
    assert run_cli(capsys, "run", wf)[0] == 0
    rc, out, _ = run_cli(capsys, "check", wf, "w")
    assert rc == 0 and "w@n=1" in out and "w@n=2" in out and "all 2 checked stages reproduce" in out
    rc, out, _ = run_cli(capsys, "verify", wf, "w")
    assert rc == 0 and "w@n=1" in out and "w@n=2" in out and "verified 2 artifact(s)" in out
    rc, _, err = run_cli(capsys, "show", wf, "w")
    assert rc == 2 and "stage 'w' is a sweep of 2 entries; name one: w@n=1, w@n=2" in err
