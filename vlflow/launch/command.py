"""Command lines for the three launchers; no torch import (used when planning and by the runner's process).

Every launcher starts `python -m vlflow.launch.worker` once per rank; the worker then calls the matching
`colossalai.launch_from_*` function. torchrun passes rank/world size/master address through its own environment
variables; for mpirun and srun the master address and port go on the worker's command line. torchrun across nodes
inside a Slurm allocation is started on every node at once by srun (one agent per node).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from vlflow.errors import LaunchError
from vlflow.stage import LaunchSpec

WORKER_MODULE = "vlflow.launch.worker"
# Exported to every rank by mpirun (`-x NAME` forwards the caller's value); srun forwards the whole environment.
MPI_EXPORTED_ENV = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "VIRTUAL_ENV")


JOIN_DIR_ENV = "VLFLOW_JOIN_DIR"  # where node 0 announces multi-node torchrun launches (shared with every node)
# torchrun's agent on each node, started by srun: bash only puts that node's SLURM_NODEID in as --node_rank, then
# becomes the agent (exec). It ignores Slurm's warning signal (USR1), whose default action would kill the agent and
# with it the ranks; the training loop of each rank installs its own handler (vlflow.executors.preempt).
TORCHRUN_PER_NODE_SCRIPT = 'trap "" USR1; exec "$0" -m torch.distributed.run --node_rank "$SLURM_NODEID" "$@"'


# Open MPI refuses to start as root without both (CI containers run as root).
OPENMPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launcher_env(launch: LaunchSpec) -> dict[str, str]:
    """Environment variables the launcher process itself needs beyond the caller's."""
    if launch.launcher == "mpirun" and os.geteuid() == 0:
        return dict(OPENMPI_ROOT_ENV)
    return {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def srun_starts_torchrun(launch: LaunchSpec) -> bool:
    """torchrun across nodes from inside a Slurm allocation (salloc, sbatch, the Slurm executor's job): srun starts
    one torchrun agent on every node of it. Not when node 0 announces the launch to joining nodes (VLFLOW_JOIN_DIR),
    nor for a node other than node 0, which only ever joins."""
    return (launch.launcher == "torchrun" and launch.nnodes > 1 and launch.node_rank == 0
            and bool(os.environ.get("SLURM_JOB_ID")) and not os.environ.get(JOIN_DIR_ENV))


def secrets_reach_every_rank(launch: LaunchSpec) -> bool:
    """Whether the launcher's environment reaches every rank: torchrun's ranks inherit it, mpirun exports what `-x`
    names (to remote nodes too), srun forwards the whole environment. Not torchrun across nodes started by hand
    (`vlflow.launch.join`): the other nodes' agents start from their own environment and read node 0's payload."""
    return not (launch.launcher == "torchrun" and launch.nnodes > 1 and not srun_starts_torchrun(launch))


def resolve_port(launch: LaunchSpec) -> int:
    """`launch.master_port`, or when it is 0 a port free here: on a single node, and for mpirun/srun (also srun
    starting torchrun agents), which start every rank from this one command (rank 0 then listens on a port that was
    free on this host; set master_port when that may not hold on the first node). Separate torchrun agents started
    by hand on several nodes must agree on it."""
    if launch.master_port:
        return launch.master_port
    if launch.nnodes > 1 and launch.launcher == "torchrun" and not srun_starts_torchrun(launch):
        raise LaunchError("master_port must be set (not 0) when nnodes > 1: every node has to agree on it",
                          field="launch.master_port")
    return free_port()


LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")
SCONTROL_TIMEOUT_SECONDS = 30


def resolve_master_addr(launch: LaunchSpec) -> str:
    """Where rank 0 listens. mpirun, srun, and srun starting torchrun agents, across nodes inside a Slurm allocation
    (salloc, sbatch): the address of the allocation's first node (where Slurm and Open MPI place rank 0, and node
    rank 0 of torchrun is SLURM_NODEID 0) unless master_addr names one; outside an allocation master_addr must be
    given. torchrun started by hand on each node: master_addr as given."""
    if (launch.launcher == "torchrun" and not srun_starts_torchrun(launch)) or launch.nnodes == 1 \
            or launch.master_addr not in LOOPBACK_ADDRESSES:
        return launch.master_addr
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError(f"launcher {launch.launcher} with nnodes {launch.nnodes} needs master_addr (the first "
                          "node's address) or a Slurm allocation to take it from (run inside salloc or sbatch)",
                          field="launch.master_addr")
    return first_node_address(nodelist)


def first_node_address(nodelist: str) -> str:
    """The address Slurm knows for the first node of `nodelist` (its NodeAddr, which is its host name on most
    clusters)."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    fields = dict(field.split("=", 1) for field in _scontrol("show", "node", first, "--oneliner").split()
                  if "=" in field)
    return fields.get("NodeAddr") or first


def _scontrol(*args: str) -> str:
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise LaunchError("scontrol not found on PATH: cannot read the Slurm allocation's first node; "
                          "set launch.master_addr", field="launch.master_addr") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"scontrol {' '.join(args)} did not answer within {SCONTROL_TIMEOUT_SECONDS} s "
                          "(is slurmctld reachable?)", field="launch.master_addr") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise LaunchError(f"scontrol {' '.join(args)} failed: {done.stderr.strip() or 'no output'}",
                          field="launch.master_addr")
    return done.stdout


def _check(launch: LaunchSpec) -> None:
    if launch.node_rank >= launch.nnodes:
        raise LaunchError(f"node_rank {launch.node_rank} must be smaller than nnodes {launch.nnodes}",
                          field="launch.node_rank")


def build_command(launch: LaunchSpec, payload_path: Path, python: str = sys.executable,
                  forward_env: Iterable[str] = ()) -> list[str]:
    """The command that starts all ranks of this node (torchrun) or of the whole job (mpirun, srun).

    `forward_env`: names of further environment variables mpirun must export to the ranks (torchrun and srun pass
    the whole environment on).
    """
    _check(launch)
    port = str(resolve_port(launch))
    payload = str(payload_path)
    if launch.launcher == "torchrun":
        # Static rendezvous through master_addr/master_port (torchrun's default without --rdzv-backend): each
        # node passes its node_rank, and node 0 hosts the TCP store. torchrun's log dir goes beside the payload
        # (the stage's staging dir) rather than a /tmp/torchelastic_* dir that a killed agent would leave behind.
        log_dir = [] if {"--log-dir", "--log_dir"} & {a.split("=")[0] for a in launch.extra_args} else \
            ["--log-dir", str(Path(payload).parent / "torchelastic")]
        if srun_starts_torchrun(launch):
            _check_allocation_size(launch)
            # The same static rendezvous, each node's rank from Slurm: the same global ranks on the same nodes as
            # srun's and mpirun's (rank r on node r // nproc_per_node), rank 0 on the first node.
            return [*srun_one_task_per_node(launch.nnodes), "bash", "-c", TORCHRUN_PER_NODE_SCRIPT, python,
                    "--nproc_per_node", str(launch.nproc_per_node), "--nnodes", str(launch.nnodes),
                    "--master_addr", resolve_master_addr(launch), "--master_port", port,
                    *log_dir, *launch.extra_args,
                    "-m", WORKER_MODULE, payload]
        return [python, "-m", "torch.distributed.run",
                "--nproc_per_node", str(launch.nproc_per_node), "--nnodes", str(launch.nnodes),
                "--node_rank", str(launch.node_rank), "--master_addr", launch.master_addr, "--master_port", port,
                *log_dir, *launch.extra_args,
                "-m", WORKER_MODULE, payload]
    worker_address = ["--master-addr", resolve_master_addr(launch), "--master-port", port]
    if launch.launcher == "mpirun":
        names = dict.fromkeys([*MPI_EXPORTED_ENV, *forward_env])  # ordered, without duplicates
        exported = [arg for name in names for arg in ("-x", name)]
        return ["mpirun", "-np", str(launch.nproc_per_node * launch.nnodes), "--npernode", str(launch.nproc_per_node),
                *_mpirun_placement(launch), *exported, *launch.extra_args,
                python, "-m", WORKER_MODULE, "--launcher", "openmpi", *worker_address, payload]
    if launch.launcher == "slurm":
        return ["srun", "--nodes", str(launch.nnodes), "--ntasks-per-node", str(launch.nproc_per_node),
                "--ntasks", str(launch.nproc_per_node * launch.nnodes), "--kill-on-bad-exit=1",
                *launch.extra_args,
                python, "-m", WORKER_MODULE, "--launcher", "slurm", *worker_address, payload]
    raise LaunchError(f"unknown launcher {launch.launcher!r}", field="launch.launcher")


def _check_allocation_size(launch: LaunchSpec) -> None:
    allocated = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    if allocated.isdigit() and int(allocated) < launch.nnodes:
        raise LaunchError(f"nnodes {launch.nnodes}, but the Slurm allocation (job {os.environ['SLURM_JOB_ID']}) has "
                          f"{allocated} node(s): ask salloc/sbatch for --nodes={launch.nnodes} or lower nnodes",
                          field="launch.nnodes")


def srun_one_task_per_node(nnodes: int) -> list[str]:
    """srun of one task on each of `nnodes` nodes of the current allocation. The task gets the CPUs the job asked
    per task (SLURM_CPUS_PER_TASK: the executor's cpus_per_task, with one task per node), which Slurm 22.05's srun
    no longer takes from the environment by itself; a node's GPUs go to the step whole (Slurm's default for GRES)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return ["srun", "--nodes", str(nnodes), "--ntasks-per-node", "1", "--ntasks", str(nnodes),
            "--kill-on-bad-exit=1", *([f"--cpus-per-task={cpus}"] if cpus.isdigit() else [])]


def _mpirun_placement(launch: LaunchSpec) -> list[str]:
    """Open MPI binds each rank to one core by default, which starves a rank's data loader and intra-op threads:
    `--bind-to none` unless extra_args choose a binding. More ranks per node than this machine has cores need
    `--oversubscribe`, else mpirun refuses to start (small CPU runs; GPU nodes have cores to spare)."""
    given = {arg.split("=")[0] for arg in launch.extra_args}
    placement = [] if given & {"--bind-to", "-bind-to"} else ["--bind-to", "none"]
    if launch.nproc_per_node > (os.cpu_count() or 1) and "--oversubscribe" not in given:
        placement.append("--oversubscribe")
    return placement
