"""What a Slurm batch job runs: `python -m vlflow.executors.job payload.json`.

The same per-stage entry point as on the login node: `vlflow.execute` for a one-process stage, the distributed
launcher (torchrun / mpirun / srun per the stage's `launch`) for a distributed one. Output goes to the job's output
file, which the login-side executor streams into the stage log; the artifact is committed there, once.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    payload_path = Path(argv[0])
    payload = json.loads(payload_path.read_text())
    from vlflow.stage import LaunchSpec, get_spec

    spec = get_spec(payload["uses"])
    if not spec.distributed:
        from vlflow.execute import main as execute

        return execute([str(payload_path)])
    from vlflow.errors import VlflowError
    from vlflow.launch import free_port, run_distributed

    launch = LaunchSpec(**(payload.get("launch") or {}))
    if launch.nnodes > 1 and launch.master_addr == "127.0.0.1":
        # this batch shell runs on the allocation's first node, where Slurm also places rank 0
        launch.master_addr = socket.gethostbyname(socket.gethostname())
    if launch.master_port == 0:
        launch.master_port = free_port("0.0.0.0")
    try:
        run_distributed(spec, payload_path, launch, Path(os.devnull), on_line=lambda line: print(line, flush=True))
    except VlflowError as exc:
        print(f"error: {str(exc).splitlines()[0]}", flush=True)  # its log tail is in this output already
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
