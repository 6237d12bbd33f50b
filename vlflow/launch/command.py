"""Command lines for the three launchers; no torch import (used when planning and by the runner's process).

Every launcher starts `python -m vlflow.launch.worker` once per rank; the worker then calls the matching
`colossalai.launch_from_*` function. torchrun passes rank/world size/master address through its own environment
variables; for mpirun and srun the master address and port go on the worker's command line.
"""
from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from pathlib import Path

from vlflow.errors import LaunchError
from vlflow.stage import LaunchSpec

WORKER_MODULE = "vlflow.launch.worker"
# Exported to every rank by mpirun (`-x NAME` forwards the caller's value); srun forwards the whole environment.
MPI_EXPORTED_ENV = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "VIRTUAL_ENV")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_port(launch: LaunchSpec) -> int:
    """`launch.master_port`, or a free local port when it is 0 on a single node."""
    if launch.master_port:
        return launch.master_port
    if launch.nnodes > 1:
        raise LaunchError("master_port must be set (not 0) when nnodes > 1: every node has to agree on it",
                          field="launch.master_port")
    return free_port()


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
        return [python, "-m", "torch.distributed.run",
                "--nproc_per_node", str(launch.nproc_per_node), "--nnodes", str(launch.nnodes),
                "--node_rank", str(launch.node_rank), "--master_addr", launch.master_addr, "--master_port", port,
                *log_dir, *launch.extra_args,
                "-m", WORKER_MODULE, payload]
    worker_address = ["--master-addr", launch.master_addr, "--master-port", port]
    if launch.launcher == "mpirun":
        names = dict.fromkeys([*MPI_EXPORTED_ENV, *forward_env])  # ordered, without duplicates
        exported = [arg for name in names for arg in ("-x", name)]
        return ["mpirun", "-np", str(launch.nproc_per_node * launch.nnodes), "--npernode", str(launch.nproc_per_node),
                *exported, *launch.extra_args,
                python, "-m", WORKER_MODULE, "--launcher", "openmpi", *worker_address, payload]
    if launch.launcher == "slurm":
        return ["srun", "--nodes", str(launch.nnodes), "--ntasks-per-node", str(launch.nproc_per_node),
                "--ntasks", str(launch.nproc_per_node * launch.nnodes), "--kill-on-bad-exit=1",
                *launch.extra_args,
                python, "-m", WORKER_MODULE, "--launcher", "slurm", *worker_address, payload]
    raise LaunchError(f"unknown launcher {launch.launcher!r}", field="launch.launcher")
