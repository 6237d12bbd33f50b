"""No-op `vlflow run` on a fully cached 5-stage workflow holding 20k artifact files.

Usage: .venv/bin/python benchmarks/noop_run.py [--files 20000] [--repeats 5] [--dvc PATH] [--snakemake PATH]
Prints the median wall time of the no-op run (a fresh `vlflow run` process, as a user types it) and, when installed,
the same pipeline's `dvc repro` / `snakemake` no-op for comparison (goal: <= 0.35x snakemake's). The tools run in
alternating rounds (one run of each per round, after one untimed warm-up run each), so that a change of machine load
during the benchmark touches all of them alike; the load average is printed with the figures.
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

VLFLOW = str(Path(sys.executable).with_name("vlflow"))


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    """Seconds of one run of `cmd`. Python may cache bytecode, as it does on a user's machine: with
    PYTHONDONTWRITEBYTECODE set (some CI shells set it), every run would compile again each module edited since its
    last cached compile, a cost no installed tool pays."""
    env = {name: value for name, value in (os.environ if env is None else env).items()
           if name != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


Command = tuple[list[str], Path, dict | None]  # argv, working directory, environment (None: this process's)


def alternating_rounds(commands: dict[str, Command], repeats: int) -> dict[str, list[float]]:
    """Seconds of each of `commands` (name -> argv, cwd, env) in `repeats` rounds of one run each, after one untimed
    warm-up run each: a load change during the benchmark touches every tool alike."""
    for cmd, cwd, env in commands.values():
        timed(cmd, cwd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (cmd, cwd, env) in commands.items():
            times[name].append(timed(cmd, cwd, env))
    return times


def machine_load() -> str:
    """The 1-minute load average and core count, said beside every figure (these benchmarks run on shared machines)."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


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
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {machine_load()} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vlflow"
        root.mkdir()
        write_vlflow_project(root, per_stage)
        first = timed([VLFLOW, "run", "wf.yaml"], root)
        print(f"vlflow: first run {first:.2f}s ({args.files} files)")
        commands = {"vlflow": ([VLFLOW, "run", "wf.yaml"], root, None)}
        for tool, exe, write in (("dvc", args.dvc, write_dvc_project),
                                 ("snakemake", args.snakemake, write_snakemake_project)):
            if not exe:
                print(f"{tool}: not installed (pass --{tool} PATH to compare)")
                continue
            baseline = Path(tmp) / tool
            baseline.mkdir()
            commands[tool] = (write(baseline, per_stage, exe), baseline, None)
        times = alternating_rounds(commands, args.repeats)
        ours = statistics.median(times["vlflow"])
        print(f"vlflow: no-op run median {ours:.3f}s (min {min(times['vlflow']):.3f}s, {args.repeats} rounds)")
        for tool in [name for name in times if name != "vlflow"]:
            theirs = statistics.median(times[tool])
            goal = " (goal <= 0.35x)" if tool == "snakemake" else ""
            print(f"{tool}: no-op median {theirs:.3f}s (min {min(times[tool]):.3f}s); "
                  f"vlflow/{tool} = {ours / theirs:.2f}x{goal}")
    print(f"{machine_load()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
