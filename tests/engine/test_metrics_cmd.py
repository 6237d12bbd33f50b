"""`vlflow metrics`: the returned metrics of stages side by side (sweep entries as columns), json/csv, and the change
against the previous run of each stage."""
from __future__ import annotations

import csv
import io
import json
import textwrap

import pytest

from tests.conftest import write_project_config
from vlflow.cli import main as vlflow_main

WORKFLOW = """
name: m
stages:
  data:
    uses: testing.write
    matrix: {n: [1, 3]}
    with: {files: "${matrix.n}", size: 10}
  join:
    uses: testing.concat
    inputs: {a: data}
  later:
    uses: testing.write
    with: {files: 2}
"""


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_project_config(tmp_path)
    (tmp_path / "wf.yaml").write_text(textwrap.dedent(WORKFLOW))
    rc, out, err = run_cli(capsys, "run", "wf.yaml", "--until", "join")
    assert rc == 0, out + err
    return tmp_path


def test_json_has_each_entry_and_a_stage_not_run(project, capsys):
    rc, out, _ = run_cli(capsys, "metrics", "wf.yaml", "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert list(data) == ["data@n=1", "data@n=3", "join@n=1", "join@n=3", "later"]
    assert data["data@n=3"]["metrics"] == {"files": 3, "bytes": 30}
    assert data["join@n=1"]["metrics"] == {"chars": 10}
    assert data["data@n=1"]["previous_key"] is None and data["data@n=1"]["change"] == {}
    assert data["later"]["key"] is None and data["later"]["metrics"] == {} and "never run" in data["later"]["note"]


def test_change_against_the_previous_run_of_the_same_stage(project, capsys):
    assert run_cli(capsys, "run", "wf.yaml", "--until", "data", "--set", "stages.data.with.size=25")[0] == 0
    rc, out, _ = run_cli(capsys, "metrics", "wf.yaml", "data", "--format", "json", "--set",
                         "stages.data.with.size=25")
    data = json.loads(out)
    assert rc == 0 and list(data) == ["data@n=1", "data@n=3"]  # a sweep's name selects its entries
    entry = data["data@n=3"]
    assert entry["metrics"] == {"files": 3, "bytes": 75} and entry["previous"] == {"files": 3, "bytes": 30}
    assert entry["change"] == {"files": 0, "bytes": 45} and entry["previous_key"] != entry["key"]
    # the other way round: the first run is current again, the size-25 run is now the previous one
    rc, out, _ = run_cli(capsys, "metrics", "wf.yaml", "data@n=1", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [(r["stage"], r["metric"], r["value"], r["previous"], r["change"]) for r in rows] == [
        ("data@n=1", "files", "1", "1", "0"), ("data@n=1", "bytes", "10", "25", "-15")]


def test_table_puts_entries_side_by_side(project, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = run_cli(capsys, "metrics", "wf.yaml", "data", "join")
    assert rc == 0
    lines = out.splitlines()
    bytes_row = next(line for line in lines if line.strip("│ ").startswith("bytes"))
    assert [cell.strip() for cell in bytes_row.split("│")[1:-1]] == ["bytes", "10", "30", "", ""]
    assert "@n=1" in out and "@n=3" in out


def test_unknown_stage_is_an_error(project, capsys):
    rc, _, err = run_cli(capsys, "metrics", "wf.yaml", "nope")
    assert rc == 2 and "no stage named 'nope'" in err
