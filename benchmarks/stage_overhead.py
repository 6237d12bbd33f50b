"""Per-stage overhead: a forced `vlflow run` of an N-stage chain of trivial stages, in ms per stage.

Usage: .venv/bin/python benchmarks/stage_overhead.py [--stages 100] [--repeats 3] [--dvc PATH] [--snakemake PATH]
Each stage is `testing.write` of one 16-byte file after the previous one, so the time is the engine's: planning,
starting the stage process, committing its artifact (the whole run's wall time divided by the number of stages, start-up
included). Measured both ways in the same invocation: stage processes forked from the warm server (the default) and a
fresh interpreter per stage (VLFLOW_STAGE_PROCESS=spawn, the fallback). When installed, the same chain under
`snakemake --forceall` and `dvc repro --force` runs side by side. All of them run in alternating rounds (see
noop_run.alternating_rounds); the load average is printed with the figures (goal: vlflow <= 20 ms per stage).
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

from noop_run import alternating_rounds, machine_load, timed  # benchmarks/ is on the path when this script runs

VLFLOW = str(Path(sys.executable).with_name("vlflow"))
TOUCH = "python3 -c \"open('{out}', 'w').write('x' * 16)\""


def write_vlflow_project(root: Path, stages: int) -> None:
    (root / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    lines = ["name: chain", "stages:"]
    for i in range(stages):
        needs = f", needs: [s{i - 1}]" if i else ""
        lines.append(f"  s{i}: {{uses: testing.write, with: {{files: 1, size: 16, text: s{i}}}{needs}}}")
    (root / "wf.yaml").write_text("\n".join(lines) + "\n")


def write_snakemake_project(root: Path, stages: int, snakemake: str) -> list[str]:
    rules = [f"rule all:\n    input: 's{stages - 1}.txt'\n"]
    for i in range(stages):
        needs = f"    input: 's{i - 1}.txt'\n" if i else ""
        rules.append(f"rule s{i}:\n{needs}    output: 's{i}.txt'\n    shell: \"echo x > {{output}}\"\n")
    (root / "Snakefile").write_text("\n".join(rules))
    return [snakemake, "-c1", "--quiet", "--forceall"]


def write_dvc_project(root: Path, stages: int, dvc: str) -> list[str]:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)
    lines = ["stages:"]
    for i in range(stages):
        lines += [f"  s{i}:", f"    cmd: echo x > s{i}.txt", f"    outs: [s{i}.txt]"]
        lines += [f"    deps: [s{i - 1}.txt]"] if i else []
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")
    return [dvc, "repro", "--force"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dvc", default=shutil.which("dvc"), help="dvc executable to compare with")
    parser.add_argument("--snakemake", default=shutil.which("snakemake"), help="snakemake executable")
    args = parser.parse_args()
    n = args.stages
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {machine_load()} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vlflow"
        root.mkdir()
        write_vlflow_project(root, n)
        timed([VLFLOW, "run", "wf.yaml"], root)  # fills the cache; forced runs below redo every stage
        forced = [VLFLOW, "run", "wf.yaml", "--force", "s0"]
        commands = {f"vlflow ({mode})": (forced, root, dict(os.environ, VLFLOW_STAGE_PROCESS=mode))
                    for mode in ("forkserver", "spawn")}
        for tool, exe, write in (("snakemake", args.snakemake, write_snakemake_project),
                                 ("dvc", args.dvc, write_dvc_project)):
            if not exe:
                print(f"{tool}: not installed (pass --{tool} PATH to compare)")
                continue
            baseline = Path(tmp) / tool
            baseline.mkdir()
            commands[tool] = (write(baseline, n, exe), baseline, None)
        times = alternating_rounds(commands, args.repeats)
    per_stage = {name: statistics.median(runs) / n * 1000 for name, runs in times.items()}
    ours = per_stage["vlflow (forkserver)"]
    for name, runs in times.items():
        ratio = "" if name == "vlflow (forkserver)" else f"; vlflow (forkserver)/{name} = {ours / per_stage[name]:.2f}x"
        print(f"{name}: forced {n}-stage chain median {statistics.median(runs):.2f}s = {per_stage[name]:.1f} ms per "
              f"stage (min {min(runs) / n * 1000:.1f} ms, {args.repeats} rounds){ratio}")
    print(f"goal: vlflow <= 20 ms per stage; {machine_load()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
