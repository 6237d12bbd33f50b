"""Malformed workflows: every error names the file, the line and the dotted field, in one paragraph."""
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlflow.errors import VlflowError, WorkflowError
from vlflow.workflow import load_workflow


@dataclass
class Case:
    id: str
    text: str  # wf.yaml (dedented; its first line is line 1)
    file: str  # "wf.yaml", another file name written from `files`, or "--set ..." for override errors
    line: int | None
    field: str | None
    message: str  # a substring of the message
    overrides: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # other files next to wf.yaml
    env: dict = field(default_factory=dict)
    launch_defaults: dict | None = None


WRITE = "uses: testing.write"
CASES = [
    # --- YAML itself -------------------------------------------------------------------------------------------
    Case("yaml-syntax", """
        stages:
          w: {uses: testing.write
          c: {uses: testing.concat}
    """, "wf.yaml", 3, None, "invalid YAML"),
    Case("yaml-tab-indent", "stages:\n  w:\n\tuses: testing.write\n", "wf.yaml", 3, None, "tab character"),
    Case("yaml-bad-indent", """
        stages:
          w:
            uses: testing.write
           with: {}
    """, "wf.yaml", 4, None, "invalid YAML"),
    Case("yaml-two-documents", "stages: {}\n---\nstages: {}\n", "wf.yaml", 2, None,
         "expected a single document in the stream, but found another document"),
    Case("duplicate-top-level-key", """
        params: {a: 1}
        stages:
          w: {uses: testing.write}
        params: {a: 2}
    """, "wf.yaml", 4, "params", "duplicate key 'params' (first defined on line 1)"),
    Case("duplicate-stage", """
        stages:
          w:
            uses: testing.write
          w:
            uses: testing.concat
    """, "wf.yaml", 4, "stages.w", "duplicate key 'w'"),
    Case("duplicate-with-key", """
        stages:
          w:
            uses: testing.write
            with:
              files: 1
              files: 2
    """, "wf.yaml", 6, "stages.w.with.files", "duplicate key 'files' (first defined on line 5)"),
    Case("duplicate-in-flow-mapping", "stages:\n  w: {uses: testing.write, uses: testing.concat}\n",
         "wf.yaml", 2, "stages.w.uses", "duplicate key"),
    Case("non-string-key", """
        stages:
          w:
            uses: testing.write
            with:
              on: 1
    """, "wf.yaml", 5, "stages.w.with", "mapping keys must be strings, got True"),
    Case("recursive-alias", """
        params:
          a: &loop [1, *loop]
        stages:
          w: {uses: testing.write}
    """, "wf.yaml", 2, "params.a.1", "recursive YAML alias"),
    # --- top level ---------------------------------------------------------------------------------------------
    Case("top-level-list", "- uses: testing.write\n", "wf.yaml", 1, None, "must be a mapping"),
    Case("top-level-scalar", "just text\n", "wf.yaml", 1, None, "must be a mapping"),
    Case("empty-file", "", "wf.yaml", 1, "stages", "defines no stages"),
    Case("unknown-top-level-key", """
        name: x
        stage:
          w: {uses: testing.write}
    """, "wf.yaml", 2, "stage", "unknown top-level key 'stage' (did you mean 'stages'?)"),
    Case("stages-not-mapping", """
        stages:
          - w
    """, "wf.yaml", 1, "stages", "expected a mapping of stage name -> stage, got a list"),
    Case("params-not-mapping", """
        params: 3
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 1, "params", "expected a mapping of params, got an integer 3"),
    Case("name-not-string", """
        name: [a]
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 1, "name", "expected a string, got a list"),
    Case("bad-workflow-name", """
        name: my flow
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 1, "name", "invalid workflow name 'my flow'"),
    Case("defaults-unknown-key", """
        defaults:
          lunch: {nproc_per_node: 2}
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 2, "defaults.lunch", "unknown key 'lunch' in defaults"),
    # --- stages ------------------------------------------------------------------------------------------------
    Case("bad-stage-name", """
        stages:
          1st:
            uses: testing.write
    """, "wf.yaml", 2, "stages.1st", "invalid stage name '1st'"),
    Case("stage-not-mapping", """
        stages:
          w: testing.write
    """, "wf.yaml", 2, "stages.w", "expected a stage mapping (with `uses:`), got a string 'testing.write'"),
    Case("missing-uses", """
        stages:
          w:
            with: {files: 1}
    """, "wf.yaml", 2, "stages.w", "missing `uses:`"),
    Case("uses-not-string", """
        stages:
          w:
            uses: [testing.write]
    """, "wf.yaml", 3, "stages.w.uses", "expected a stage type name, got a list"),
    Case("unknown-stage-type", """
        stages:
          w:
            uses: testing.wirte
    """, "wf.yaml", 3, "stages.w.uses", "unknown stage type 'testing.wirte' (did you mean 'testing.write'"),
    Case("unknown-stage-key", """
        stages:
          w:
            uses: testing.write
            width: {files: 1}
    """, "wf.yaml", 4, "stages.w.width", "unknown stage key 'width' (did you mean 'with'?)"),
    # --- params (`with`) ---------------------------------------------------------------------------------------
    Case("with-not-mapping", """
        stages:
          w:
            uses: testing.write
            with: [files, 1]
    """, "wf.yaml", 4, "stages.w.with", "expected a mapping of parameters, got a list"),
    Case("with-wrong-type", """
        stages:
          w:
            uses: testing.write
            with:
              size: 4
              files: abc
    """, "wf.yaml", 6, "stages.w.with.files", "valid integer, unable to parse string as an integer, got 'abc'"),
    Case("with-unknown-param", """
        stages:
          w:
            uses: testing.write
            with:
              fils: 3
    """, "wf.yaml", 5, "stages.w.with.fils", "unknown parameter 'fils' (did you mean 'files'"),
    Case("with-out-of-range", """
        stages:
          w:
            uses: testing.write
            with: {files: -1}
    """, "wf.yaml", 4, "stages.w.with.files", "greater than or equal to 0, got -1"),
    Case("with-bad-boolean", """
        stages:
          w:
            uses: testing.write
            with:
              fail: perhaps
    """, "wf.yaml", 5, "stages.w.with.fail", "valid boolean"),
    Case("with-wrong-type-from-param", """
        params:
          steps: lots
        stages:
          t:
            uses: testing.train
            with:
              steps: ${params.steps}
    """, "wf.yaml", 7, "stages.t.with.steps", "got 'lots'"),
    Case("with-several-errors", """
        stages:
          w:
            uses: testing.write
            with: {files: x, size: y}
    """, "wf.yaml", 4, "stages.w.with.files", "(and 1 more error)"),
    # --- inputs and needs --------------------------------------------------------------------------------------
    Case("missing-required-input", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs: {b: w}
    """, "wf.yaml", 5, "stages.c.inputs.a", "missing required input 'a' of testing.concat"),
    Case("missing-inputs-block", """
        stages:
          c:
            uses: testing.concat
    """, "wf.yaml", 2, "stages.c.inputs.a", "missing required input 'a'"),
    Case("unknown-input", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs:
              a: w
              c: w
    """, "wf.yaml", 7, "stages.c.inputs.c", "unknown input 'c' (testing.concat takes: a, b)"),
    Case("input-on-stage-without-inputs", """
        stages:
          v: {uses: testing.write}
          w:
            uses: testing.write
            inputs: {a: v}
    """, "wf.yaml", 5, "stages.w.inputs.a", "testing.write takes no inputs"),
    Case("dangling-input", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs:
              a: ww/file.txt
    """, "wf.yaml", 6, "stages.c.inputs.a", "dangling input: no stage named 'ww' in this workflow (did you mean 'w'"),
    Case("input-not-string", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs: {a: [w]}
    """, "wf.yaml", 5, "stages.c.inputs.a", "expected STAGE or STAGE/sub/path, got a list"),
    Case("input-escapes-artifact", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs:
              a: w/../../etc/passwd
    """, "wf.yaml", 6, "stages.c.inputs.a", "invalid path '../../etc/passwd' inside stage 'w'"),
    Case("input-empty-segment", """
        stages:
          w: {uses: testing.write}
          c: {uses: testing.concat, inputs: {a: w//x}}
    """, "wf.yaml", 3, "stages.c.inputs.a", "invalid path '/x'"),
    Case("input-self", """
        stages:
          c:
            uses: testing.concat
            inputs:
              a: c
    """, "wf.yaml", 5, "stages.c.inputs.a", "stage 'c' depends on itself"),
    Case("input-unknown-param", """
        params: {model: w}
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs:
              a: "${params.modle}/file.txt"
    """, "wf.yaml", 7, "stages.c.inputs.a", "no params.modle (did you mean 'model'"),
    Case("input-param-names-no-stage", """
        params: {model: ww}
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs: {a: "${params.model}"}
    """, "wf.yaml", 6, "stages.c.inputs.a", "dangling input: no stage named 'ww'"),
    Case("input-stage-output-ref", """
        stages:
          w: {uses: testing.write}
          c:
            uses: testing.concat
            inputs: {a: "${stages.w.output}"}
    """, "wf.yaml", 5, "stages.c.inputs.a", "only allowed in a stage's `with` block"),
    Case("needs-param-not-a-stage-name", """
        params: {after: 3}
        stages:
          w: {uses: testing.write}
          v:
            uses: testing.write
            needs: ["${params.after}"]
    """, "wf.yaml", 6, "stages.v.needs.0", "expected a stage name, got an integer"),
    Case("needs-not-list", """
        stages:
          w: {uses: testing.write}
          v:
            uses: testing.write
            needs: {w: true}
    """, "wf.yaml", 5, "stages.v.needs.w", "expected `all` (run once, after every entry of w's sweep)"),
    Case("needs-unknown-stage", """
        stages:
          w: {uses: testing.write}
          v:
            uses: testing.write
            needs:
              - w
              - x
    """, "wf.yaml", 7, "stages.v.needs.1", "unknown stage: no stage named 'x'"),
    Case("needs-self", """
        stages:
          v:
            uses: testing.write
            needs: [v]
    """, "wf.yaml", 4, "stages.v.needs.0", "stage 'v' depends on itself"),
    Case("cycle-two-stages", """
        stages:
          a:
            uses: testing.concat
            inputs: {a: b}
          b:
            uses: testing.concat
            inputs: {a: a}
    """, "wf.yaml", 2, "stages.a", "dependency cycle: a -> b -> a"),
    Case("cycle-three-stages-via-needs", """
        stages:
          w: {uses: testing.write}
          x: {uses: testing.write, needs: [z]}
          y: {uses: testing.write, needs: [x]}
          z: {uses: testing.write, needs: [y, w]}
    """, "wf.yaml", 3, "stages.x", "dependency cycle: x -> y -> z -> x"),
    Case("cycle-via-stage-output", """
        stages:
          a:
            uses: testing.write
            with: {text: "${stages.b.output}"}
          b:
            uses: testing.concat
            inputs: {a: a}
    """, "wf.yaml", 2, "stages.a", "dependency cycle: a -> b -> a"),
    # --- interpolation -----------------------------------------------------------------------------------------
    Case("unknown-reference-kind", """
        stages:
          w:
            uses: testing.write
            with:
              text: "x ${foo.bar}"
    """, "wf.yaml", 5, "stages.w.with.text", "unknown reference ${foo.bar}"),
    Case("unknown-param", """
        params:
          files: 2
        stages:
          w:
            uses: testing.write
            with:
              files: ${params.fils}
    """, "wf.yaml", 7, "stages.w.with.files", "no params.fils (did you mean 'files'?)"),
    Case("param-path-through-scalar", """
        params: {n: 2}
        stages:
          w:
            uses: testing.write
            with: {files: "${params.n.x}"}
    """, "wf.yaml", 5, "stages.w.with.files", "params.n is an integer, it has no 'x'"),
    Case("unterminated-reference", """
        params: {n: 2}
        stages:
          w:
            uses: testing.write
            with: {text: "a ${params.n"}
    """, "wf.yaml", 5, "stages.w.with.text", "unterminated or nested '${'"),
    Case("empty-params-reference", """
        stages:
          w:
            uses: testing.write
            with: {text: "${params.}"}
    """, "wf.yaml", 4, "stages.w.with.text", "malformed reference ${params.}"),
    Case("env-missing", """
        stages:
          w:
            uses: testing.write
            with:
              text: ${env.WF_UNSET_VARIABLE}
    """, "wf.yaml", 5, "stages.w.with.text", "environment variable WF_UNSET_VARIABLE is not set"),
    Case("env-malformed", """
        stages:
          w:
            uses: testing.write
            with:
              text: ${env.WF-X}
    """, "wf.yaml", 5, "stages.w.with.text", "malformed reference ${env.WF-X}"),
    Case("stage-ref-unknown", """
        stages:
          w:
            uses: testing.write
          v:
            uses: testing.write
            with:
              text: "${stages.ww.output}/file"
    """, "wf.yaml", 7, "stages.v.with.text", "names no stage of this workflow (did you mean 'w'"),
    Case("stage-ref-malformed", """
        stages:
          w: {uses: testing.write}
          v:
            uses: testing.write
            with: {text: "${stages.w.outputs}"}
    """, "wf.yaml", 5, "stages.v.with.text", "expected ${stages.NAME.output}"),
    Case("stage-ref-self", """
        stages:
          w:
            uses: testing.write
            with:
              text: ${stages.w.output}
    """, "wf.yaml", 5, "stages.w.with.text", "stage 'w' depends on itself"),
    Case("escaped-stage-ref", """
        stages:
          w: {uses: testing.write}
          v:
            uses: testing.write
            with:
              text: "$${stages.w.output}"
    """, "wf.yaml", 6, "stages.v.with.text", "a stage output reference cannot be escaped"),
    Case("params-stage-ref-unknown", """
        params:
          model: ${stages.pretrain.output}/model
        stages:
          w: {uses: testing.write}
    """, "wf.yaml", 2, "params.model", "${stages.pretrain.output} names no stage of this workflow"),
    Case("params-cycle", """
        params:
          a: ${params.b}
          b: "x${params.a}"
        stages:
          w: {uses: testing.write}
    """, "wf.yaml", 2, "params.a", "reference cycle: params.a -> params.b -> params.a"),
    Case("mapping-into-text", """
        params:
          d: {x: 1}
        stages:
          w:
            uses: testing.write
            with: {text: "value ${params.d}"}
    """, "wf.yaml", 6, "stages.w.with.text", "${params.d} is a dict; it cannot be inserted into text"),
    Case("stage-ref-in-launch", """
        stages:
          w: {uses: testing.write}
          t:
            uses: testing.train
            launch:
              extra_args: ["${stages.w.output}"]
    """, "wf.yaml", 6, "stages.t.launch.extra_args.0", "only allowed in a stage's `with` block"),
    Case("secret-env-not-printed", """
        stages:
          w:
            uses: testing.write
            with:
              files: ${env.API_KEY}
    """, "wf.yaml", 5, "stages.w.with.files", "got '***'", env={"API_KEY": "hunter2-secret"}),
    # --- overrides ---------------------------------------------------------------------------------------------
    Case("set-without-equals", "stages: {w: {uses: testing.write}}\n", "--set params.seed", None, None,
         "expected PATH=VALUE", overrides=["params.seed"]),
    Case("set-empty-path", "stages: {w: {uses: testing.write}}\n", "--set =3", None, None,
         "empty path segment", overrides=["=3"]),
    Case("set-empty-segment", "stages: {w: {uses: testing.write}}\n", "--set params..seed=3", None, None,
         "empty path segment in 'params..seed'", overrides=["params..seed=3"]),
    Case("set-through-scalar", "stages: {w: {uses: testing.write}}\n", "--set stages.w.uses.x=1", None,
         "stages.w.uses.x", "stages.w.uses is a string, not a mapping", overrides=["stages.w.uses.x=1"]),
    Case("set-bad-yaml-value", "stages: {w: {uses: testing.write}}\n", "--set params.x=[1,", None, "params.x",
         "cannot parse value '[1,'", overrides=["params.x=[1,"]),
    Case("set-wrong-type", "stages: {w: {uses: testing.write}}\n", "--set stages.w.with.files=abc", None,
         "stages.w.with.files", "got 'abc'", overrides=["stages.w.with.files=abc"]),
    Case("set-unknown-top-level", "stages: {w: {uses: testing.write}}\n", "--set seed=1", None, "seed",
         "unknown top-level key 'seed'", overrides=["seed=1"]),
    Case("set-include", "stages: {w: {uses: testing.write}}\n", "--set include=[other.yaml]", None, "include",
         "`include` cannot be changed with --set", overrides=["include=[other.yaml]"]),
    Case("set-unknown-stage-key", "stages: {w: {uses: testing.write}}\n", "--set stages.w.witth.files=2",
         None, "stages.w.witth", "unknown stage key 'witth'", overrides=["stages.w.witth.files=2"]),
    # --- include / extends -------------------------------------------------------------------------------------
    Case("include-missing-file", """
        include:
          - base.yaml
          - missing.yaml
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 3, "include.1", "included file not found", files={"base.yaml": "params: {a: 1}\n"}),
    Case("include-cycle", """
        include: [a.yaml]
        stages: {w: {uses: testing.write}}
    """, "b.yaml", 1, "include.0", "include cycle: wf.yaml -> a.yaml -> b.yaml -> wf.yaml",
         files={"a.yaml": "include: [b.yaml]\n", "b.yaml": "include: [wf.yaml]\n"}),
    Case("include-self", """
        stages: {w: {uses: testing.write}}
        include: wf.yaml
    """, "wf.yaml", 2, "include", "include cycle: wf.yaml -> wf.yaml"),
    Case("include-not-list", """
        include: {file: base.yaml}
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 1, "include", "expected a list of file paths, got a mapping"),
    Case("extends-list", """
        extends: [a.yaml, b.yaml]
        stages: {w: {uses: testing.write}}
    """, "wf.yaml", 1, "extends", "expected one file path, got a list"),
    Case("extends-missing-file", """
        extends: nowhere/base.yaml
    """, "wf.yaml", 1, "extends", "included file not found"),
    Case("extends-outside-the-tree", """
        extends: ../nowhere/base.yaml
    """, "wf.yaml", 1, "extends", "is outside the workflow's directory tree (allowed: "),
    Case("error-inside-included-file", """
        include: [base.yaml]
        stages:
          v: {uses: testing.write}
    """, "base.yaml", 3, "stages.w.uses", "unknown stage type 'testing.nope'",
         files={"base.yaml": "stages:\n  w:\n    uses: testing.nope\n"}),
    Case("included-file-unknown-top-level-key", """
        include: [base.yaml]
        stages: {w: {uses: testing.write}}
    """, "base.yaml", 2, "parameters", "unknown top-level key 'parameters'",
         files={"base.yaml": "# shared\nparameters: {a: 1}\n"}),
    # --- launch ------------------------------------------------------------------------------------------------
    Case("launch-on-local-stage", """
        stages:
          w:
            uses: testing.write
            launch: {nproc_per_node: 2}
    """, "wf.yaml", 4, "stages.w.launch", "`launch` is only allowed on distributed stages"),
    Case("launch-not-mapping", """
        stages:
          t:
            uses: testing.train
            launch: 2
    """, "wf.yaml", 4, "stages.t.launch", "expected a mapping of launch settings, got an integer 2"),
    Case("launch-bad-value", """
        stages:
          t:
            uses: testing.train
            launch:
              plugin: torch_ddp
              nproc_per_node: 0
    """, "wf.yaml", 6, "stages.t.launch.nproc_per_node", "greater than or equal to 1, got 0"),
    Case("launch-unknown-key", """
        stages:
          t:
            uses: testing.train
            launch:
              nprocs: 2
    """, "wf.yaml", 5, "stages.t.launch.nprocs", "unknown launch setting 'nprocs'"),
    Case("launch-bad-plugin", """
        stages:
          t:
            uses: testing.train
            launch: {plugin: deepspeed}
    """, "wf.yaml", 4, "stages.t.launch.plugin", "got 'deepspeed'"),
    Case("defaults-launch-bad-precision", """
        defaults:
          launch:
            precision: fp8
        stages:
          w: {uses: testing.write}
    """, "wf.yaml", 3, "defaults.launch.precision", "'fp32', 'fp16' or 'bf16', got 'fp8'"),
    Case("defaults-launch-port-from-param", """
        params: {port: 70000}
        defaults:
          launch: {master_port: "${params.port}"}
        stages:
          t: {uses: testing.train}
    """, "wf.yaml", 3, "defaults.launch.master_port", "less than or equal to 65535"),
    Case("project-launch-default-bad", """
        stages:
          t: {uses: testing.train}
    """, "wf.yaml", 1, "defaults.launch.backend", "(from the project's launch defaults)",
         launch_defaults={"backend": "mpi"}),
]


def test_enough_malformed_cases():
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_workflow(case: Case, tmp_path: Path):
    main = tmp_path / "wf.yaml"
    main.write_text(textwrap.dedent(case.text).lstrip("\n"))
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(WorkflowError) as info:
        load_workflow(main, overrides=case.overrides, env=case.env, launch_defaults=case.launch_defaults)
    error = info.value
    expected_file = case.file if case.file.startswith("--set") else str(tmp_path / case.file)
    assert (error.file, error.line, error.field) == (expected_file, case.line, case.field)
    assert case.message in error.message
    location = expected_file if case.line is None else f"{expected_file}:{case.line}"
    assert str(error).startswith(location + ": ")
    assert "\n" not in str(error)  # one paragraph
    assert isinstance(error, VlflowError)


def test_missing_workflow_file(tmp_path):
    with pytest.raises(WorkflowError, match="workflow file not found") as info:
        load_workflow(tmp_path / "nope.yaml")
    assert info.value.file == str(tmp_path / "nope.yaml")


def test_secret_values_never_appear_in_errors(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("stages:\n  w:\n    uses: testing.write\n    with: {size: '${env.DB_PASSWORD}'}\n")
    with pytest.raises(WorkflowError) as info:
        load_workflow(path, env={"DB_PASSWORD": "pa55word!"})
    assert "pa55word!" not in str(info.value) and "***" in str(info.value)
    path.write_text("stages:\n  w:\n    uses: testing.write\n    with: {size: '${env.DB_SIZE}'}\n")
    with pytest.raises(WorkflowError) as info:  # a harmless variable name: the value helps the user
        load_workflow(path, env={"DB_SIZE": "visible"})
    assert "got 'visible'" in str(info.value)
