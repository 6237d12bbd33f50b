"""A stage's cache key follows exactly the code it runs: the modules its entry imports transitively (found with ast,
nothing imported) plus the engine code hosting it. Editing one of them reruns the stage and `plan` names the file;
editing a module the stage does not import leaves it cached."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import vlflow.stage
from tests.conftest import write_project_config
from vlflow.cli import main as vlflow_main
from vlflow.code_digest import clear_cache, code_digest
from vlflow.stage import get_spec

# A third-party stage package, registered through the real "vlflow.stages" entry-point group (a dist-info dir on
# sys.path), so the stage also runs in vlflow's child process.
TOY_PACKAGE = {
    "toystages/__init__.py": "",
    "toystages/spec.py": """
        from vlflow.stage import Params, StageSpec

        STAGES = [
            StageSpec(name="toy.echo", entry="toystages.echo:run", params=Params),
            StageSpec(name="toy.other", entry="toystages.other:run", params=Params),
        ]
    """,
    "toystages/echo.py": """
        from toystages.lib import shout


        def run(ctx):
            from . import fmt  # imported inside the function: still part of the stage's code

            (ctx.output_dir / "out.txt").write_text(fmt.frame(shout("hello")))
    """,
    "toystages/lib.py": """
        from .util import helpers


        def shout(text):
            return helpers.upper(text) + "!"
    """,
    "toystages/util/__init__.py": "",
    "toystages/util/helpers.py": """
        def upper(text):
            return text.upper()
    """,
    "toystages/fmt.py": """
        def frame(text):
            return f"[{text}]"
    """,
    "toystages/other.py": """
        def run(ctx):
            (ctx.output_dir / "other.txt").write_text("other")
    """,
    "toystages-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: toystages\nVersion: 0.1\n",
    "toystages-0.1.dist-info/entry_points.txt": "[vlflow.stages]\ntoy = toystages.spec:STAGES\n",
}


@pytest.fixture
def toy_project(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for relpath, text in TOY_PACKAGE.items():
        path = site / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))  # the stage's child process
    monkeypatch.setattr(vlflow.stage, "_registry", None)
    monkeypatch.setenv("COLUMNS", "250")  # plan's table on one line per reason
    clear_cache()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    write_project_config(project)
    (project / "wf.yaml").write_text("stages:\n  echo: {uses: toy.echo}\n  other: {uses: toy.other}\n")
    yield site
    clear_cache()
    for name in [m for m in sys.modules if m == "toystages" or m.startswith("toystages.")]:
        del sys.modules[name]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    clear_cache()  # a new vlflow process would read the files afresh


def run_cli(capsys, *argv) -> str:
    rc = vlflow_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    return out


def plan_rows(out: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5:
            current = cells[0] or current
            if current:
                rows[current] = " ".join((rows.get(current, "") + " " + " ".join(cells[2:])).split())
    return rows


def test_files_of_a_stage_are_its_transitive_imports_and_the_engine(toy_project):
    files = code_digest("toystages.echo", False).files
    assert {"toystages/__init__.py", "toystages/echo.py", "toystages/lib.py", "toystages/fmt.py",
            "toystages/util/__init__.py", "toystages/util/helpers.py"} <= set(files)
    assert "toystages/other.py" not in files and "toystages/spec.py" not in files
    assert {"vlflow/execute.py", "vlflow/stage.py"} <= set(files)  # the engine code that runs a local stage
    assert "vlflow/launch/worker.py" not in files and "vlflow/cli.py" not in files
    assert "vlflow/launch/booster.py" in code_digest("toystages.echo", True).files  # builds a distributed plugin
    assert "toystages.echo" not in sys.modules


def test_builtin_stage_keys_cover_the_shared_code_they_import_and_nothing_else():
    pretrain = get_spec("vilt.pretrain").code().files
    assert {"stages/vilt/train.py", "stages/vilt/model.py", "stages/common/training.py", "stages/data/reader.py",
            "vlflow/launch/worker.py", "vlflow/launch/booster.py"} <= set(pretrain)
    assert "stages/vilt/evaluate.py" not in pretrain and "stages/unitab/train.py" not in pretrain
    assert "stages/vilt/evaluate.py" in get_spec("vilt.evaluate_retrieval").code().files
    write = get_spec("testing.write").code().files
    assert "stages/testing/toy.py" in write and "stages/testing/train.py" not in write


def test_editing_imported_code_reruns_and_plan_names_the_file(toy_project, capsys):
    out = run_cli(capsys, "run", "wf.yaml")
    assert "2 ran, 0 cached" in out
    assert (next(Path("cache").rglob("out.txt"))).read_text() == "[HELLO!]"

    edit(toy_project / "toystages/util/helpers.py", "text.upper()", "text.upper() * 2")
    rows = plan_rows(run_cli(capsys, "plan", "wf.yaml"))
    assert "run" in rows["echo"] and "code: toystages/util/helpers.py changed" in rows["echo"], rows
    assert "cached" in rows["other"], rows
    out = run_cli(capsys, "run", "wf.yaml")
    assert "1 ran, 1 cached" in out
    assert sorted(p.read_text() for p in Path("cache").rglob("out.txt")) == ["[HELLO!]", "[HELLOHELLO!]"]

    edit(toy_project / "toystages/fmt.py", 'f"[{text}]"', 'f"<{text}>"')  # imported inside the function
    rows = plan_rows(run_cli(capsys, "plan", "wf.yaml"))
    assert "code: toystages/fmt.py changed" in rows["echo"], rows


def test_editing_code_the_stage_does_not_import_keeps_it_cached(toy_project, capsys):
    assert "2 ran" in run_cli(capsys, "run", "wf.yaml")
    edit(toy_project / "toystages/other.py", '"other"', '"other, edited"')
    rows = plan_rows(run_cli(capsys, "plan", "wf.yaml"))
    assert "cached" in rows["echo"], rows
    assert "code: toystages/other.py changed" in rows["other"], rows
    assert "1 ran, 1 cached" in run_cli(capsys, "run", "wf.yaml")
