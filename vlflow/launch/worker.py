"""One rank of a distributed stage: `python -m vlflow.launch.worker [--launcher L] payload.json`.

Started by torchrun, mpirun or srun (see command.py). Joins the process group through colossalai, builds the
Booster from the payload's launch settings, runs the stage function with a StageContext that carries rank, world
size, booster and plugin, and on rank 0 writes the returned metrics to `<payload>.result.json`.
"""
from __future__ import annotations

import sys

from vlflow.procs import die_with_parent

if __name__ == "__main__":
    # A rank never outlives its launcher agent (torchrun, orted, slurmstepd). Tied before the seconds of imports
    # below; torchrun's ranks (no --launcher) also check the agent is still their parent, so that a `vlflow run`
    # killed while ranks start up cannot leave one behind, orphaned and waiting.
    die_with_parent(parent_command=() if "--launcher" in sys.argv else ("torch.distributed.run", "torchrun"))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import colossalai  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from colossalai.accelerator import get_accelerator, set_accelerator  # noqa: E402

from vlflow.errors import LaunchError, VlflowError  # noqa: E402
from vlflow.execute import context_from_payload, write_result  # noqa: E402
from vlflow.launch.booster import booster_factory  # noqa: E402
from vlflow.payload import StagePayload  # noqa: E402
from vlflow.stage import LaunchSpec, get_spec  # noqa: E402

DEFAULT_SEED = 1024  # colossalai's own default, used when the stage has no `seed` param

# Where each launcher puts the rank's index on its node.
LOCAL_RANK_VARIABLES = {"torchrun": "LOCAL_RANK", "openmpi": "OMPI_COMM_WORLD_LOCAL_RANK", "slurm": "SLURM_LOCALID"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlflow.launch.worker")
    parser.add_argument("--launcher", choices=sorted(LOCAL_RANK_VARIABLES), default="torchrun")
    parser.add_argument("--master-addr", default="127.0.0.1", help="openmpi/slurm only (torchrun sets MASTER_ADDR)")
    parser.add_argument("--master-port", type=int, default=29500, help="openmpi/slurm only")
    parser.add_argument("payload", type=Path)
    return parser.parse_args(argv)


def select_backend(launch: LaunchSpec) -> str:
    """The communication backend; colossalai derives it from the accelerator, so choose the accelerator."""
    if launch.backend == "gloo":
        set_accelerator("cpu")  # gloo means CPU training even on a machine with GPUs
    elif launch.backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend nccl needs CUDA GPUs and none is available; use backend: auto or gloo",
                          field="launch.backend")
    return get_accelerator().communication_backend


def init_distributed(launcher: str, launch: LaunchSpec, master_addr: str, master_port: int, seed: int) -> None:
    backend = select_backend(launch)
    if launcher == "torchrun":
        colossalai.launch_from_torch(backend=backend, seed=seed)
    elif launcher == "openmpi":
        colossalai.launch_from_openmpi(host=master_addr, port=master_port, backend=backend, seed=seed)
    else:
        colossalai.launch_from_slurm(host=master_addr, port=master_port, backend=backend, seed=seed)


def run(args: argparse.Namespace, payload: dict) -> None:
    launch = LaunchSpec(**(payload.get("launch") or {}))
    spec = get_spec(payload["uses"])
    # validates params before joining the group; a sealed payload's secrets come from (and leave) the environment
    ctx = context_from_payload(StagePayload.of(payload).unsealed())
    ctx.launch = launch
    init_distributed(args.launcher, launch, args.master_addr, args.master_port,
                     seed=getattr(ctx.params, "seed", DEFAULT_SEED))
    ctx.rank = dist.get_rank()
    ctx.world_size = dist.get_world_size()
    ctx.local_rank = int(os.environ.get(LOCAL_RANK_VARIABLES[args.launcher], 0))
    if not ctx.is_main:  # one copy of the stage's INFO messages is enough
        logging.getLogger().setLevel(logging.WARNING)
    ctx.booster_factory = booster_factory(launch)  # the stage builds its booster once (fit: with its grad_clip)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = spec.load()(ctx)
    if ctx.is_main:
        write_result(args.payload, metrics)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    payload = json.loads(args.payload.read_text())
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID") or "0"
    logging.basicConfig(level=payload.get("log_level", "INFO"), stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    try:
        run(args, payload)
    except VlflowError as exc:  # user-facing: one line, no traceback (run_distributed shows it as the headline)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
