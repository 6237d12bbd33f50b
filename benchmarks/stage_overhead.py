"""Per-stage overhead: a forced `vlflow run` of an N-stage chain of trivial stages, in ms per stage.

Usage: .venv/bin/python benchmarks/stage_overhead.py [--stages 100] [--repeats 3]
Each stage is `testing.write` of one 16-byte file after the previous one, so the time is the engine's: planning,
starting the stage process, committing its artifact. Measured both ways in the same invocation: stage processes
forked from the warm server (the default) and a fresh interpreter per stage (VLFLOW_STAGE_PROCESS=spawn, the fallback
and the behaviour before). When installed, the same chain under `snakemake --forceall` and `dvc repro --force` runs
side by side (goal: vlflow <= 20 ms per stage).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from noop_run import timed, warm_median  # benchmarks/ is on the path when this script runs

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
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vlflow"
        root.mkdir()
        write_vlflow_project(root, n)
        timed([VLFLOW, "run", "wf.yaml"], root)  # fills the cache; forced runs below redo every stage
        figures = {}
        for mode in ("forkserver", "spawn"):
            env = dict(os.environ, VLFLOW_STAGE_PROCESS=mode)
            runs = [timed([VLFLOW, "run", "wf.yaml", "--force", "s0"], root, env) for _ in range(args.repeats)]
            figures[mode] = statistics.median(runs) / n * 1000
            print(f"vlflow ({mode} stage processes): forced {n}-stage chain median {statistics.median(runs):.2f}s "
                  f"= {figures[mode]:.1f} ms per stage (min {min(runs) / n * 1000:.1f} ms, {args.repeats} runs)")
        print(f"forkserver vs spawn: {figures['spawn'] / figures['forkserver']:.1f}x less per-stage time "
              f"(goal <= 20 ms per stage)")
        for tool, exe, write in (("snakemake", args.snakemake, write_snakemake_project),
                                 ("dvc", args.dvc, write_dvc_project)):
            if not exe:
                print(f"{tool}: not installed (pass --{tool} PATH to compare)")
                continue
            baseline = Path(tmp) / tool
            baseline.mkdir()
            cmd = write(baseline, n, exe)
            theirs = warm_median(cmd, baseline, args.repeats) / n * 1000
            print(f"{tool}: forced {n}-stage chain {theirs:.1f} ms per stage; "
                  f"vlflow/{tool} = {figures['forkserver'] / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
