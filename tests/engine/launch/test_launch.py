"""Distributed launch: command lines, real 2-process runs of testing.train (gloo on CPU), kill + resume, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlflow.errors import LaunchError
from vlflow.launch import build_command, free_port, run_distributed
from vlflow.stage import LaunchSpec, get_spec

LAUNCH_ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = {"steps": 12, "checkpoint_every": 5}
WAIT_SECONDS = 120  # upper bound for any single wait on a launch


def make_payload(run_dir: Path, launch: LaunchSpec, params: dict, uses: str = "testing.train",
                 name: str = "payload.json") -> Path:
    (run_dir / "work").mkdir(parents=True, exist_ok=True)
    payload = {"stage": "train", "uses": uses, "params": params, "inputs": {},
               "output_dir": str(run_dir / "out"), "work_dir": str(run_dir / "work"),
               "launch": launch.model_dump(), "log_level": "INFO"}
    path = run_dir / name
    path.write_text(json.dumps(payload))
    return path


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted((output_dir / "model").glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no model saved in {output_dir / 'model'}"
    return weights


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (to prove a launch left nothing behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if text in cmdline and "\nState:\tZ" not in status:
                found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Command lines (no processes started)

def test_torchrun_command_single_node_picks_a_free_port(tmp_path):
    command = build_command(LaunchSpec(nproc_per_node=2), tmp_path / "p.json", python="py")
    assert command[:3] == ["py", "-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[command.index("--nnodes") + 1] == "1"
    assert command[command.index("--master_addr") + 1] == "127.0.0.1"
    assert int(command[command.index("--master_port") + 1]) > 0
    assert command[-3:] == ["-m", "vlflow.launch.worker", str(tmp_path / "p.json")]


def test_torchrun_command_multi_node_uses_given_address_and_extra_args(tmp_path):
    launch = LaunchSpec(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400,
                        extra_args=["--max-restarts", "0"])
    command = build_command(launch, tmp_path / "p.json", python="py")
    assert command == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2",
                       "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400",
                       "--log-dir", str(tmp_path / "torchelastic"),  # in the stage's staging dir, not /tmp
                       "--max-restarts", "0", "-m", "vlflow.launch.worker", str(tmp_path / "p.json")]
    own = build_command(launch.model_copy(update={"extra_args": ["--log-dir=/logs"]}), tmp_path / "p.json", "py")
    assert own.count("--log-dir") == 0 and "--log-dir=/logs" in own  # the user's own choice wins


def test_multi_node_without_port_or_with_bad_node_rank_is_a_clear_error(tmp_path):
    with pytest.raises(LaunchError, match="master_port"):
        build_command(LaunchSpec(nnodes=2), tmp_path / "p.json")
    with pytest.raises(LaunchError, match="node_rank 2 must be smaller than nnodes 2"):
        build_command(LaunchSpec(nnodes=2, node_rank=2, master_port=1234), tmp_path / "p.json")


def test_mpirun_command_shape(tmp_path):
    launch = LaunchSpec(launcher="mpirun", nproc_per_node=4, nnodes=2, master_addr="node0", master_port=29500,
                        extra_args=["--hostfile", "hosts"])
    command = build_command(launch, tmp_path / "p.json", python="py", forward_env=["NCCL_DEBUG"])
    assert command[:5] == ["mpirun", "-np", "8", "--npernode", "4"]
    assert command[command.index("NCCL_DEBUG") - 1] == "-x"
    assert command[command.index("OMP_NUM_THREADS") - 1] == "-x"  # forwarded to every rank
    assert command[command.index("--hostfile") + 1] == "hosts"
    assert command[command.index("py"):] == ["py", "-m", "vlflow.launch.worker", "--launcher", "openmpi",
                                             "--master-addr", "node0", "--master-port", "29500",
                                             str(tmp_path / "p.json")]


def test_slurm_command_shape(tmp_path):
    launch = LaunchSpec(launcher="slurm", nproc_per_node=8, nnodes=4, master_addr="node0", master_port=29500)
    command = build_command(launch, tmp_path / "p.json", python="py")
    assert command[0] == "srun"
    assert command[command.index("--nodes") + 1] == "4"
    assert command[command.index("--ntasks-per-node") + 1] == "8"
    assert command[command.index("--ntasks") + 1] == "32"
    assert command[command.index("py"):] == ["py", "-m", "vlflow.launch.worker", "--launcher", "slurm",
                                             "--master-addr", "node0", "--master-port", "29500",
                                             str(tmp_path / "p.json")]


def test_missing_launcher_binary_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mpirun here
    launch = LaunchSpec(launcher="mpirun")
    payload = make_payload(tmp_path, launch, TRAIN)
    with pytest.raises(LaunchError, match="'mpirun' not found"):
        run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "log.txt")


# ---------------------------------------------------------------------------------------------------------------
# Real launches (2 processes, gloo)

@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[Path, dict]:
    """testing.train, 12 steps on 2 ranks, never interrupted: (run dir, metrics)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    launch = LaunchSpec(nproc_per_node=2, backend="gloo")
    payload = make_payload(run_dir, launch, TRAIN)
    lines: list[str] = []
    metrics = run_distributed(get_spec("testing.train"), payload, launch, run_dir / "log.txt", env=LAUNCH_ENV,
                              on_line=lines.append)
    return run_dir, {"metrics": metrics, "lines": lines}


def test_hybrid_parallel_as_plain_data_parallel_trains_on_cpu_ranks(tmp_path):
    """hybrid_parallel with tp = pp = 1, zero_stage 0 and bf16 passes the launch check on CPU and trains through the
    launcher on 2 gloo ranks (bf16 working weights, fp32 masters), exporting fp32 weights."""
    launch = LaunchSpec(nproc_per_node=2, backend="gloo", plugin="hybrid_parallel", zero_stage=0, precision="bf16")
    payload = make_payload(tmp_path, launch, {"steps": 6, "checkpoint_every": 100})
    metrics = run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "log.txt", env=LAUNCH_ENV)
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    logged = [json.loads(line) for line in (tmp_path / "out" / "_vlflow" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert {tensor.dtype for tensor in final_weights(tmp_path / "out").values()} == {torch.float32}


def test_two_process_training_returns_rank0_metrics(uninterrupted_run):
    run_dir, result = uninterrupted_run
    metrics = result["metrics"]
    assert metrics["world_size"] == 2 and metrics["steps"] == 12 and metrics["resumed_from_step"] == 0
    logged = [json.loads(line) for line in (run_dir / "out" / "_vlflow" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 13))
    assert logged[-1]["loss"] < logged[0]["loss"] / 2  # it actually learns
    assert metrics["final_loss"] == pytest.approx(logged[-1]["loss"])
    # Checkpoints 5 and 10 with the pointer on 10; the streamed lines are the log's lines.
    checkpoints = run_dir / "work" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_10"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_10", "step_5"]
    assert any("checkpoint saved at step 10" in line for line in result["lines"])
    assert (run_dir / "log.txt").read_text().count("checkpoint saved at step") == 2
    assert list((run_dir / "out" / "_vlflow" / "tensorboard").glob("events.*"))


def test_two_node_launch_on_loopback(tmp_path):
    """Two torchrun agents (nnodes=2, node_rank 0/1) meet at the same 127.0.0.1 port and train as one job."""
    port = free_port()
    results: dict[int, object] = {}

    def node(node_rank: int) -> None:
        launch = LaunchSpec(nproc_per_node=1, nnodes=2, node_rank=node_rank, master_addr="127.0.0.1",
                            master_port=port, backend="gloo")
        payload = make_payload(tmp_path, launch, {"steps": 4, "checkpoint_every": 2}, name=f"node{node_rank}.json")
        try:
            results[node_rank] = run_distributed(get_spec("testing.train"), payload, launch,
                                                 tmp_path / f"node{node_rank}.log", env=LAUNCH_ENV,
                                                 joining=node_rank > 0)
        except Exception as exc:  # reported by the main thread
            results[node_rank] = exc

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "a node did not finish"
    assert isinstance(results[0], dict), results[0]
    assert results[0]["world_size"] == 2
    assert results[1] is None  # only global rank 0 (on node 0) writes the result
    assert (tmp_path / "out" / "model").is_dir()


def test_kill_mid_training_then_rerun_resumes_with_identical_weights(tmp_path, uninterrupted_run):
    launch = LaunchSpec(nproc_per_node=2, backend="gloo")
    payload = make_payload(tmp_path, launch, {**TRAIN, "sleep": 0.2})
    latest = tmp_path / "work" / "checkpoints" / "latest"
    process = subprocess.Popen(build_command(launch, payload), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, **LAUNCH_ENV), start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert latest.exists(), "no checkpoint appeared before the deadline"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "out" / "model").exists(), "the run finished before it was killed"

    # Rerun the same stage (fresh output dir, as the runner gives each attempt): it continues from the checkpoint.
    rerun_payload = json.loads(payload.read_text())
    rerun_payload["output_dir"] = str(tmp_path / "out2")
    payload.write_text(json.dumps(rerun_payload))
    metrics = run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "rerun.log", env=LAUNCH_ENV)
    assert metrics["resumed_from_step"] in (5, 10)
    log = (tmp_path / "rerun.log").read_text()
    assert "resumed from checkpoint" in log and f"(step {metrics['resumed_from_step']})" in log
    logged = [json.loads(line) for line in (tmp_path / "out2" / "_vlflow" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == {"step": metrics["resumed_from_step"], "resumed_from_step": metrics["resumed_from_step"]}
    assert [entry["step"] for entry in logged[1:]] == list(range(metrics["resumed_from_step"] + 1, 13))

    expected = final_weights(uninterrupted_run[0] / "out")
    resumed = final_weights(tmp_path / "out2")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0)


def test_keyboard_interrupt_stops_every_rank(tmp_path):
    launch = LaunchSpec(nproc_per_node=2, backend="gloo")
    payload = make_payload(tmp_path, launch, {"steps": 200, "checkpoint_every": 2, "sleep": 0.2})

    def interrupt_after_first_checkpoint(line: str) -> None:
        if "checkpoint saved at step" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "log.txt", env=LAUNCH_ENV,
                        on_line=interrupt_after_first_checkpoint)
    assert processes_mentioning(str(payload)) == []


def test_failing_stage_raises_launch_error_with_log_tail(tmp_path):
    launch = LaunchSpec(nproc_per_node=1, backend="gloo")
    payload = make_payload(tmp_path, launch, {"fail": True}, uses="testing.write")
    with pytest.raises(LaunchError) as raised:
        run_distributed(get_spec("testing.write"), payload, launch, tmp_path / "log.txt", env=LAUNCH_ENV)
    message = str(raised.value)
    first_line = message.splitlines()[0]
    assert "stage train (testing.write) failed (exit code" in first_line and "failing on purpose" in first_line
    assert f"lines of {tmp_path / 'log.txt'} ---" in message
    assert "error: " in message.split("---", 1)[1]  # the tail itself, with the worker's error line
    assert not (tmp_path / "payload.json.result.json").exists()


def test_low_level_zero_on_cpu_is_a_clear_launch_error(tmp_path):
    launch = LaunchSpec(nproc_per_node=1, plugin="low_level_zero", backend="gloo")
    # The payload says torch_ddp: the launch given to run_distributed is the one the workers must use.
    payload = make_payload(tmp_path, LaunchSpec(nproc_per_node=1, backend="gloo"), TRAIN)
    with pytest.raises(LaunchError) as raised:
        run_distributed(get_spec("testing.train"), payload, launch, tmp_path / "log.txt", env=LAUNCH_ENV)
    first_line = str(raised.value).splitlines()[0]
    assert "launch.plugin: plugin low_level_zero needs CUDA GPUs" in first_line
    assert "Traceback" not in (tmp_path / "log.txt").read_text().split("error:")[0]  # no crash before the check
    assert json.loads(payload.read_text())["launch"]["plugin"] == "low_level_zero"


@pytest.mark.parametrize("launcher, ranks", [("openmpi", 2), ("slurm", 1)])
def test_worker_joins_through_the_mpi_and_slurm_environment(tmp_path, launcher, ranks):
    """The worker's launch_from_openmpi / launch_from_slurm paths, with the variables mpirun / srun would set."""
    port = free_port()
    payload = make_payload(tmp_path, LaunchSpec(nproc_per_node=ranks, backend="gloo"),
                           {"steps": 2, "checkpoint_every": 1})
    processes = []
    for rank in range(ranks):
        rank_env = ({"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_LOCAL_RANK": rank, "OMPI_COMM_WORLD_SIZE": ranks}
                    if launcher == "openmpi" else {"SLURM_PROCID": rank, "SLURM_LOCALID": rank, "SLURM_NPROCS": ranks})
        env = dict(os.environ, **LAUNCH_ENV, **{name: str(value) for name, value in rank_env.items()})
        for torchrun_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(torchrun_variable, None)
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "vlflow.launch.worker", "--launcher", launcher, "--master-addr", "127.0.0.1",
             "--master-port", str(port), str(payload)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=WAIT_SECONDS)[0])
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0] * ranks, "\n".join(outputs)[-3000:]
    result = json.loads(Path(f"{payload}.result.json").read_text())
    assert result["world_size"] == ranks and result["steps"] == 2


def test_launch_module_does_not_import_torch():
    code = "import sys, vlflow.launch; print(sorted({'torch', 'colossalai'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
