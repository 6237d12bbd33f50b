"""`python -m vlflow.launch.join --node-rank N JOIN_DIR`: a node other than node 0 of a multi-node torchrun run.

Across machines without Slurm exactly one node (node rank 0) runs `vlflow run`: it plans, runs every stage and
commits each artifact once. With VLFLOW_JOIN_DIR=JOIN_DIR set there, it announces each distributed launch
(torchrun, nnodes > 1) as a file in JOIN_DIR; this process, on every other node, starts the torchrun agent with its
own node rank for each announcement and never runs a stage of its own or commits anything. JOIN_DIR, the state dir
and the cache must be on a filesystem all nodes share (the ranks read node 0's payload, inputs and output dir).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from vlflow.errors import VlflowError
from vlflow.launch import run_distributed
from vlflow.stage import LaunchSpec, get_spec


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlflow.launch.join", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-rank", type=int, required=True, help="this node's rank, 1..nnodes-1")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between looks at JOIN_DIR")
    parser.add_argument("--exit-when-idle", type=float, default=0, metavar="SECONDS",
                        help="exit after this long without a launch to join (0: run until interrupted)")
    parser.add_argument("join_dir", type=Path)
    args = parser.parse_args(argv)
    if args.node_rank < 1:
        parser.error("--node-rank must be 1 or more: node 0 runs `vlflow run` itself")
    return args


def join(announcement: Path, node_rank: int) -> None:
    """Run this node's torchrun agent for one announced launch, its output in `<announcement>.node<N>.log`."""
    try:
        launched = json.loads(announcement.read_text())
    except (OSError, ValueError):  # the launch ended (and node 0 removed the file) before we looked
        return
    launch = LaunchSpec(**launched["launch"]).model_copy(update={"node_rank": node_rank})
    if node_rank >= launch.nnodes:
        print(f"error: stage {launched['stage']} runs on {launch.nnodes} nodes; node rank {node_rank} is not one "
              "of them", flush=True)
        return
    log_path = announcement.with_name(f"{announcement.stem}.node{node_rank}.log")
    print(f"joining stage {launched['stage']} ({launched['uses']}) as node {node_rank} of {launch.nnodes}; "
          f"log: {log_path}", flush=True)
    started = time.monotonic()
    try:
        run_distributed(get_spec(launched["uses"]), Path(launched["payload"]), launch, log_path, joining=True)
    except VlflowError as exc:  # node 0 reports the stage's failure; this node waits for the next launch
        print(f"error: {str(exc).splitlines()[0]}", flush=True)
        return
    print(f"stage {launched['stage']} done on node {node_rank} in {time.monotonic() - started:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.join_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM as Ctrl-C: run_distributed then stops this node's agent and ranks before we exit.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    seen: set[str] = set()
    idle_since = time.monotonic()
    print(f"node {args.node_rank} waiting for launches in {args.join_dir}", flush=True)
    try:
        while True:
            for announcement in sorted(args.join_dir.glob("*.json")):
                if announcement.name not in seen:
                    seen.add(announcement.name)
                    join(announcement, args.node_rank)
                    idle_since = time.monotonic()
            if args.exit_when_idle and time.monotonic() - idle_since > args.exit_when_idle:
                return 0
            time.sleep(args.poll)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
