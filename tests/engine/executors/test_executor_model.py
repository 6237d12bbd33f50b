"""The `executor:` block: validation with file:line, defaults from the workflow and vlflow.toml, and that where a
stage runs is not part of its cache key."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vlflow.config import load_config
from vlflow.errors import VlflowError, WorkflowError
from vlflow.executors.slurm import SlurmExecutor, parse_job
from vlflow.runner import Runner
from vlflow.store import ArtifactStore
from vlflow.workflow import load_workflow


def write(tmp_path, text: str, toml: str = ""):
    (tmp_path / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n' + toml)
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(path):
    config = load_config(path)
    return load_workflow(path, launch_defaults=config.launch, executor_defaults=config.executor,
                         include_paths=config.include_paths), config


WORKFLOW = """\
    name: ex
    defaults:
      executor: {type: slurm, partition: cpu, time: "10:00"}
    stages:
      convert:
        uses: testing.write
        with: {text: a}
      train:
        uses: testing.train
        with: {steps: 2}
        executor: {nodes: 2, gpus_per_node: 4, mem: 16G}
      here:
        uses: testing.write
        executor: {type: local}
    """


def test_stage_executor_merges_toml_and_workflow_defaults(tmp_path):
    path = write(tmp_path, WORKFLOW, toml='[executor]\naccount = "proj"\nshared_dirs = ["."]\n')
    workflow, _ = load(path)
    convert, train, here = (workflow.stages[n].executor for n in ("convert", "train", "here"))
    assert (convert.type, convert.partition, convert.time, convert.account) == ("slurm", "cpu", "10:00", "proj")
    assert convert.shared_dirs == [str(tmp_path.resolve())]  # relative to vlflow.toml
    assert (train.nodes, train.gpus_per_node, train.mem, train.partition) == (2, 4, "16G", "cpu")
    assert here.type == "local" and here.account == "proj"
    # a distributed stage's launch takes its shape from the allocation when it does not give one
    assert (workflow.stages["train"].launch.nnodes, workflow.stages["train"].launch.nproc_per_node) == (2, 4)


def test_local_is_the_default(tmp_path):
    workflow, _ = load(write(tmp_path, "name: ex\nstages:\n  a:\n    uses: testing.write\n"))
    assert workflow.stages["a"].executor.type == "local"


@pytest.mark.parametrize("block, expected", [
    ("{nodse: 2}", "wf.yaml:5: stages.a.executor.nodse: unknown executor setting 'nodse' (did you mean 'nodes'?)"),
    ("{type: pbs}", "wf.yaml:5: stages.a.executor.type: input should be 'local' or 'slurm'"),
    ("{nodes: 0}", "stages.a.executor.nodes: input should be greater than or equal to 1"),
    ("{nodes: true}", "stages.a.executor.nodes: expected an integer, got a boolean true"),
    ('{time: "two hours"}', "stages.a.executor.time: time must be in Slurm's --time syntax"),
    ('{partition: "gpu; rm -rf /"}', "stages.a.executor.partition: must be a Slurm name"),
])
def test_bad_executor_settings_name_file_line_and_field(tmp_path, block, expected):
    path = write(tmp_path, f"""\
        name: ex
        stages:
          a:
            uses: testing.write
            executor: {block}
        """)
    with pytest.raises(WorkflowError) as info:
        load(path)
    assert expected in str(info.value)


def test_bad_toml_executor_is_reported_against_vlflow_toml(tmp_path):
    write(tmp_path, "name: ex\nstages:\n  a:\n    uses: testing.write\n", toml="[executor]\nqso = \"high\"\n")
    with pytest.raises(VlflowError) as info:
        load_config(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'vlflow.toml'}:6: unknown key 'qso' in [executor] "
                               "(did you mean 'qos'?)")


def test_executor_is_not_part_of_the_cache_key(tmp_path):
    local_path = write(tmp_path, "name: ex\nstages:\n  a:\n    uses: testing.write\n    with: {text: a}\n")
    local, config = load(local_path)
    slurm_path = tmp_path / "slurm.yaml"
    slurm_path.write_text("name: ex\nstages:\n  a:\n    uses: testing.write\n    with: {text: a}\n"
                          "    executor: {type: slurm, partition: big, nodes: 3, time: '1:00:00'}\n")
    slurm, _ = load(slurm_path)
    store = ArtifactStore(config.cache_url)
    keys = [Runner(w, store, config.state_dir).plan()[0].key for w in (local, slurm)]
    assert keys[0] == keys[1]


def test_sbatch_options_carry_every_setting():
    from vlflow.executors.spec import ExecutorSpec

    spec = ExecutorSpec(type="slurm", partition="gpu", nodes=2, gpus_per_node=8, cpus_per_task=10, mem="64G",
                        time="2:00:00", account="a1", qos="high", constraint="v100", extra_args=["--exclusive"],
                        signal_seconds=300)
    output = Path("/x/out")
    options = SlurmExecutor(spec).sbatch_options("job", output, state_dir=Path("/x/state"))
    for option in ("--partition=gpu", "--nodes=2", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=64G",
                   "--time=2:00:00", "--account=a1", "--qos=high", "--constraint=v100", "--exclusive",
                   "--signal=B:USR1@300", f"--output={output}", "--parsable"):
        assert option in options
    assert any(o.startswith("--comment=vlflow-") for o in options)  # how vlflow status finds the run's jobs


def test_scontrol_answer_is_parsed():
    line = ("JobId=7 JobName=x UserId=root(0) JobState=OUT_OF_MEMORY Reason=OutOfMemory Dependency=(null) "
            "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:125")
    state = parse_job(line)
    assert (state.state, state.exit_code, state.signal, state.reason) == ("OUT_OF_MEMORY", 0, 125, "OutOfMemory")
    assert parse_job("slurm_load_jobs error: Invalid job id specified") is None


def test_a_multi_node_job_starts_its_ranks_with_srun_or_torchrun_per_node(tmp_path):
    workflow, _ = load(write(tmp_path, """\
        name: ex
        stages:
          train:
            uses: testing.train
            executor: {type: slurm, nodes: 2}
        """))
    launch = workflow.stages["train"].launch
    assert (launch.launcher, launch.nnodes, launch.nproc_per_node) == ("slurm", 2, 1)
    workflow, _ = load(write(tmp_path, """\
        name: ex
        stages:
          train:
            uses: testing.train
            launch: {launcher: torchrun}
            executor: {type: slurm, nodes: 2}
        """))
    launch = workflow.stages["train"].launch  # inside the job, srun starts one torchrun agent per node
    assert (launch.launcher, launch.nnodes, launch.nproc_per_node) == ("torchrun", 2, 1)
