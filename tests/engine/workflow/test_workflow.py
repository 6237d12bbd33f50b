"""Workflow loading: include/extends, interpolation, overrides, launch merging, to_dict (happy paths)."""
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, TEST_DATA
from vlflow.errors import LaunchError, VlflowError, WorkflowError
from vlflow.stage import LaunchSpec
from vlflow.workflow import InputRef, StageDecl, Workflow, load_workflow

FIXTURES = TEST_DATA / "workflows"
NO_ENV: dict = {}


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_error_formats_location_field_and_message():
    error = WorkflowError("expected an integer, got 'abc'", file="workflows/x.yaml", line=12,
                          field="stages.train.with.max_steps")
    assert str(error) == "workflows/x.yaml:12: stages.train.with.max_steps: expected an integer, got 'abc'"
    assert str(VlflowError("bad section", file="vlflow.toml")) == "vlflow.toml: bad section"
    assert str(LaunchError("no free port")) == "no free port"
    copy = pickle.loads(pickle.dumps(error))  # errors cross process boundaries (stage workers)
    assert type(copy) is WorkflowError and (copy.file, copy.line, copy.field) == ("workflows/x.yaml", 12,
                                                                                  "stages.train.with.max_steps")


def test_include_merges_base_and_including_file_wins():
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV)
    assert isinstance(wf, Workflow)
    assert wf.name == "toy"
    assert wf.path == (FIXTURES / "toy.yaml").resolve()
    assert list(wf.stages) == ["source", "joined", "train", "report"]  # base first, then file order
    assert wf.params["text"] == "toy" and wf.params["files"] == 2
    source = wf.stages["source"]
    assert isinstance(source, StageDecl)
    # defaults made explicit
    assert source.params == {"files": 2, "size": 32, "text": "toy", "sleep": 0.0, "fail": False}
    assert (Path(source.file).name, source.line) == ("base.yaml", 9)
    assert (Path(wf.stages["train"].file).name, wf.stages["train"].line) == ("toy.yaml", 15)


def test_inputs_needs_and_stage_refs_are_dependencies():
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV)
    joined, train, report = wf.stages["joined"], wf.stages["train"], wf.stages["report"]
    assert joined.inputs == {"a": InputRef("source"), "b": InputRef("source", "file_001.txt")}
    assert joined.deps() == {"source"}
    assert train.needs == ["source"] and train.deps() == {"source", "joined"}
    # ${stages.train.output} stays verbatim for the runner; the escaped $${ becomes a literal ${
    assert report.params["text"] == "trained from ${stages.train.output} (${not a reference})"
    assert report.deps() == {"train"}
    assert wf.stages["source"].deps() == set()


def test_stage_outputs_referenced_through_params(tmp_path):
    path = write(tmp_path, """
        params:
          model: "${stages.train.output}/model"
        stages:
          train: {uses: testing.write}
          use:
            uses: testing.write
            with: {text: "${params.model}"}
    """)
    wf = load_workflow(path, env=NO_ENV)
    assert wf.params["model"] == "${stages.train.output}/model"
    assert wf.stages["use"].params["text"] == "${stages.train.output}/model"
    assert wf.stages["use"].deps() == {"train"}


def test_interpolation_env_default_and_value():
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV)
    assert wf.stages["joined"].params["suffix"] == "-hello toy-none"
    wf = load_workflow(FIXTURES / "toy.yaml", env={"VLFLOW_TEST_SUFFIX": "set"})
    assert wf.stages["joined"].params["suffix"] == "-hello toy-set"


def test_extends_customises_a_shared_file(tmp_path):
    wf = load_workflow(FIXTURES / "toy_short.yaml", env=NO_ENV)
    assert wf.name == "toy_short"  # not the base's name
    assert list(wf.stages) == ["source", "joined", "train", "report", "extra"]
    train = wf.stages["train"]
    # steps replaced, lr kept
    assert train.params == {"steps": 2, "lr": 0.05, "checkpoint_every": 2, "sleep": 0.0, "text": ""}
    assert train.launch.nproc_per_node == 1 and train.launch.precision == "bf16"  # merged key by key
    assert (Path(train.file).name, train.line) == ("toy.yaml", 15)  # declared in the base
    assert wf.stages["extra"].deps() == {"report"}


def test_interpolation_keeps_types_of_whole_references(tmp_path):
    path = write(tmp_path, """
        params:
          count: 3
          ratio: 0.5
          flag: true
          items: [1, 2]
          table: {a: 1, b: "${params.count}"}
          alias: ${params.table}
          deep: ${params.alias.b}
          text: "n=${params.count} f=${params.flag} r=${params.ratio}"
          first: ${params.items.0}
          spaced: "${ params.count }"
          literal: "$${params.count} costs $$5"
          from_env: ${env.WF_NUMBER}
          fallback: ${env.WF_MISSING:-}
        stages:
          w:
            uses: testing.write
            with: {files: "${params.count}", size: "${env.WF_NUMBER}", text: "${params.text}", fail: "${params.flag}"}
    """)
    wf = load_workflow(path, env={"WF_NUMBER": "7"})
    p = wf.params
    assert p["count"] == 3 and p["ratio"] == 0.5 and p["flag"] is True and p["items"] == [1, 2]
    assert p["table"] == {"a": 1, "b": 3} and p["alias"] == {"a": 1, "b": 3} and p["deep"] == 3
    assert p["text"] == "n=3 f=true r=0.5"
    assert p["first"] == 1 and p["spaced"] == 3
    assert p["literal"] == "${params.count} costs $$5"
    assert p["from_env"] == "7" and p["fallback"] == ""
    assert wf.stages["w"].params == {"files": 3, "size": 7, "text": "n=3 f=true r=0.5", "sleep": 0.0, "fail": True}


def test_yaml_anchors_merge_keys_dates_and_exponents(tmp_path):
    path = write(tmp_path, """
        params:
          day: 2024-01-02
          lr: 1e-4
        stages:
          a: &writer
            uses: testing.write
            with: &opts {files: 2, size: 4}
          b:
            <<: *writer
            with:
              <<: *opts
              size: 9
              text: ${params.day}
    """)
    wf = load_workflow(path, env=NO_ENV)
    assert wf.params["day"] == "2024-01-02"  # not a datetime: stage params are JSON values
    assert wf.params["lr"] == 1e-4  # YAML 1.1 would read a string
    assert wf.stages["a"].params["size"] == 4
    assert wf.stages["b"].params == {"files": 2, "size": 9, "text": "2024-01-02", "sleep": 0.0, "fail": False}


def test_overrides_apply_before_validation(tmp_path):
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV, overrides=[
        "params.text=over",                      # feeds several stages through ${params.text}
        "stages.train.with.steps=11",
        "stages.train.launch.precision=fp16",
        "stages.source.with.size=${params.sizes.0}",  # overrides may use references too
        "stages.report.with.text=",              # empty value: empty string
        "params.train={steps: 4, lr: 1.5}",      # flow mapping replaces the whole value
        "name=renamed",
    ])
    assert wf.name == "renamed"
    assert wf.params["text"] == "over" and wf.params["greeting"] == "hello over"
    assert wf.stages["source"].params["text"] == "over" and wf.stages["source"].params["size"] == 8
    assert wf.stages["train"].params["steps"] == 11 and wf.stages["train"].params["lr"] == 1.5
    assert wf.stages["train"].launch.precision == "fp16"
    assert wf.stages["report"].params["text"] == "" and wf.stages["report"].deps() == set()


def test_override_can_add_a_stage(tmp_path):
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV, overrides=[
        "stages.more.uses=testing.concat", "stages.more.inputs.a=report"])
    assert list(wf.stages)[-1] == "more" and wf.stages["more"].deps() == {"report"}


def test_launch_merges_project_workflow_and_stage_settings(tmp_path):
    project = {"nproc_per_node": 4, "master_port": 29555, "backend": "gloo"}
    wf = load_workflow(FIXTURES / "toy.yaml", env=NO_ENV, launch_defaults=project)
    launch = wf.stages["train"].launch
    assert isinstance(launch, LaunchSpec)
    assert launch.nproc_per_node == 2  # workflow defaults.launch beats the project defaults
    assert launch.master_port == 29555 and launch.backend == "gloo"  # project defaults fill the rest
    assert launch.precision == "bf16"  # the stage's own launch wins
    assert wf.stages["source"].launch is None  # not a distributed stage type
    assert project == {"nproc_per_node": 4, "master_port": 29555, "backend": "gloo"}  # caller's dict untouched


def test_launch_values_are_interpolated(tmp_path):
    path = write(tmp_path, """
        params: {gpus: 2}
        stages:
          t:
            uses: testing.train
            launch: {nproc_per_node: "${params.gpus}", master_port: "${env.WF_PORT:-0}"}
    """)
    launch = load_workflow(path, env={"WF_PORT": "29501"}).stages["t"].launch
    assert launch.nproc_per_node == 2 and launch.master_port == 29501


def test_inputs_and_needs_are_interpolated(tmp_path):
    path = write(tmp_path, """
        params: {model: pretrained, after: [a]}
        stages:
          a: {uses: testing.write}
          pretrained: {uses: testing.write}
          finetuned: {uses: testing.write}
          evaluate:
            uses: testing.concat
            inputs: {a: "${params.model}/file_000.txt"}
            needs: "${params.after}"
          other:
            uses: testing.concat
            inputs: {a: "${env.UPSTREAM:-a}"}
            needs: ["${params.model}"]
    """)
    wf = load_workflow(path, env=NO_ENV)
    assert wf.stages["evaluate"].inputs["a"] == InputRef("pretrained", "file_000.txt")
    assert wf.stages["evaluate"].needs == ["a"]
    assert wf.stages["other"].inputs["a"] == InputRef("a", "") and wf.stages["other"].needs == ["pretrained"]
    switched = load_workflow(path, overrides=["params.model=finetuned"], env={"UPSTREAM": "finetuned"})
    assert switched.stages["evaluate"].deps() == {"finetuned", "a"}
    assert switched.stages["other"].deps() == {"finetuned"}


def test_to_dict_round_trips(tmp_path):
    wf = load_workflow(FIXTURES / "toy_short.yaml", env={"VLFLOW_TEST_SUFFIX": "x"},
                       launch_defaults={"master_port": 29512})
    document = wf.to_dict()
    dumped = write(tmp_path, yaml.safe_dump(document, sort_keys=False), "resolved.yaml")
    again = load_workflow(dumped, env=NO_ENV)  # no env, no project defaults: everything is explicit
    assert again.to_dict() == document
    for name, decl in wf.stages.items():
        other = again.stages[name]
        assert (other.params, other.inputs, other.needs, other.launch) == (decl.params, decl.inputs, decl.needs,
                                                                            decl.launch)
        assert other.deps() == decl.deps()


def test_to_dict_masks_values_from_secret_env_vars(tmp_path):
    path = write(tmp_path, """
        params:
          token: ${env.HUB_TOKEN}
          note: "user ${env.HUB_USER}"
        stages:
          w:
            uses: testing.write
            with: {text: "auth ${params.token}"}
    """)
    wf = load_workflow(path, env={"HUB_TOKEN": "tok-12345", "HUB_USER": "alice"})
    assert wf.stages["w"].params["text"] == "auth tok-12345"  # the stage gets the real value
    document = wf.to_dict()
    assert document["params"] == {"token": "***", "note": "user alice"}
    assert document["stages"]["w"]["with"]["text"] == "auth ***"  # only the secret itself is masked
    assert "tok-12345" not in yaml.safe_dump(document)


def test_file_order_and_workflow_name_from_file(tmp_path):
    path = write(tmp_path, """
        stages:
          zeta: {uses: testing.write}
          alpha: {uses: testing.concat, inputs: {a: zeta}}
          mid: {uses: testing.write, needs: zeta}
    """, name="my-flow.yaml")
    wf = load_workflow(path, env=NO_ENV)
    assert wf.name == "my-flow" and wf.params == {}
    assert list(wf.stages) == ["zeta", "alpha", "mid"]
    assert wf.stages["mid"].needs == ["zeta"]  # a single name is accepted for needs
    assert [wf.stages[s].line for s in wf.stages] == [2, 3, 4]


def test_input_subpaths_are_normalised(tmp_path):
    path = write(tmp_path, """
        stages:
          data: {uses: testing.write}
          c:
            uses: testing.concat
            inputs: {a: data/, b: data/./karpathy/dataset_coco.json}
    """)
    inputs = load_workflow(path, env=NO_ENV).stages["c"].inputs
    assert inputs == {"a": InputRef("data"), "b": InputRef("data", "karpathy/dataset_coco.json")}
    assert str(inputs["b"]) == "data/karpathy/dataset_coco.json"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "workflows").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_project_workflows_validate(path):
    """Every workflow shipped in workflows/ loads; variables it requires (no default) get a URL-shaped value."""
    required = re.findall(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())
    wf = load_workflow(path, env={name: "https://example.invalid/placeholder" for name in required})
    assert wf.stages


def test_validation_imports_no_heavy_libraries():
    """Loading a workflow (which imports every stage spec) must not import torch, transformers or colossalai."""
    code = ("import sys; from vlflow.workflow import load_workflow; "
            f"load_workflow({str(FIXTURES / 'toy.yaml')!r}, env={{}}); "
            "print(sorted(m for m in ('torch', 'transformers', 'colossalai') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
