"""No-op `vlflow run` on a fully cached 5-stage workflow holding 20k artifact files.

Usage: .venv/bin/python benchmarks/noop_run.py [--files 20000] [--repeats 5]
Prints the median wall time of the no-op run (a fresh `vlflow run` process, as a user types it) and, when installed,
the same pipeline's `dvc repro` / `snakemake` no-op for comparison (goal: <= 0.5x theirs and < 1 s).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLFLOW = str(Path(sys.executable).with_name("vlflow"))


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def warm_median(cmd: list[str], cwd: Path, repeats: int) -> float:
    """Median seconds of `repeats` runs of `cmd` after one untimed warm-up run (a baseline tool's timing)."""
    timed(cmd, cwd)
    return statistics.median(timed(cmd, cwd) for _ in range(repeats))


def write_vlflow_project(root: Path, files_per_stage: int) -> None:
    (root / "vlflow.toml").write_text('[cache]\nurl = "cache"\n[state]\ndir = "state"\n')
    stages = []
    for i in range(5):
        needs = f", needs: [s{i - 1}]" if i else ""
        spec = f"{{files: {files_per_stage}, size: 64, text: s{i}}}"
        stages.append(f"  s{i}: {{uses: testing.write, with: {spec}{needs}}}")
    (root / "wf.yaml").write_text("name: noop\nstages:\n" + "\n".join(stages) + "\n")


MAKE_FILES = ("import os; os.makedirs('{d}', exist_ok=True); "
              "[open(f'{d}/f{{j}}', 'w').write('x'*64) for j in range({n})]")


def write_dvc_project(root: Path, files_per_stage: int, dvc: str) -> list[str]:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=root, check=True)
    lines = ["stages:"]
    for i in range(5):
        lines += [f"  s{i}:", f"    cmd: python3 -c \"{MAKE_FILES.format(d=f's{i}', n=files_per_stage)}\"",
                  f"    outs: [s{i}]"] + ([f"    deps: [s{i - 1}]"] if i else [])
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")
    return [dvc, "repro"]


def write_snakemake_project(root: Path, files_per_stage: int, snakemake: str) -> list[str]:
    rules = ["rule all:\n    input: 's4'\n"]
    for i in range(5):
        needs = f"    input: 's{i - 1}'\n" if i else ""
        code = MAKE_FILES.format(d=f"s{i}", n=files_per_stage).replace("{", "{{").replace("}", "}}")
        rules.append(f"rule s{i}:\n{needs}    output: directory('s{i}')\n    shell: \"python3 -c \\\"{code}\\\"\"\n")
    (root / "Snakefile").write_text("\n".join(rules))
    return [snakemake, "-c1", "--quiet"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20000, help="artifact files in total (5 stages)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dvc", default=shutil.which("dvc"), help="dvc executable to compare with")
    parser.add_argument("--snakemake", default=shutil.which("snakemake"), help="snakemake executable")
    args = parser.parse_args()
    per_stage = args.files // 5
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vlflow"
        root.mkdir()
        write_vlflow_project(root, per_stage)
        first = timed([VLFLOW, "run", "wf.yaml"], root)
        noop = [timed([VLFLOW, "run", "wf.yaml"], root) for _ in range(args.repeats)]
        ours = statistics.median(noop)
        print(f"vlflow: first run {first:.2f}s ({args.files} files); no-op run median {ours:.3f}s "
              f"(min {min(noop):.3f}s, {args.repeats} runs)")
        for tool, exe, write in (("dvc repro", args.dvc, write_dvc_project),
                                 ("snakemake", args.snakemake, write_snakemake_project)):
            if not exe:
                print(f"{tool}: not installed (pass --{tool.split()[0]} PATH to compare)")
                continue
            baseline = Path(tmp) / tool.split()[0]
            baseline.mkdir()
            cmd = write(baseline, per_stage, exe)
            theirs = warm_median(cmd, baseline, args.repeats)
            print(f"{tool}: no-op median {theirs:.3f}s; vlflow/{tool.split()[0]} = {ours / theirs:.2f}x (goal <= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
