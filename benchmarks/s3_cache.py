"""The artifact cache on S3 (a moto server on 127.0.0.1) against a local cache, in the same invocation.

Usage: .venv/bin/python benchmarks/s3_cache.py [--files 20000] [--stages 100] [--rounds 3] [--json OUT]

1. First run of the 5-stage workflow of benchmarks/noop_run.py (`testing.write` stages, `--files` 64-byte files in
   all) into an empty local cache and into an empty S3 cache, alternating, a fresh cache each round
   (goal: S3 <= 3x local).
2. No-op run of a fully cached `--stages`-stage chain of trivial stages (benchmarks/stage_overhead.py's workflow) on
   both caches, alternating (goal: S3 <= 1.5x local, one request per stage).
Every figure is the median wall time of a fresh `vlflow run` process, as a user types it; S3 runs also report the
requests the server received (counted by a WSGI wrapper around moto's app, so every HTTP request is seen). The load
average is printed before and after: on a shared machine compare the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

VLFLOW = str(Path(sys.executable).with_name("vlflow"))
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


class CountingMotoServer:
    """moto's S3 app served on 127.0.0.1 by a threaded werkzeug server that counts the requests it answers."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        self.url = "http://127.0.0.1:%d" % self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "CountingMotoServer":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._thread.join()

    def take(self) -> Counter[str]:
        """The requests counted since the last call (by HTTP method), and a fresh count."""
        with self._lock:
            taken, self.requests = self.requests, Counter()
        return taken

    def create_bucket(self) -> str:
        import boto3

        name = f"vlflow-bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=name)
        return name


def write_files_workflow(root: Path, files: int) -> None:
    """benchmarks/noop_run.py's workflow: 5 chained testing.write stages of files/5 64-byte files each."""
    stages = []
    for i in range(5):
        needs = f", needs: [s{i - 1}]" if i else ""
        stages.append(f"  s{i}: {{uses: testing.write, with: {{files: {files // 5}, size: 64, text: s{i}}}{needs}}}")
    (root / "files.yaml").write_text("name: files\nstages:\n" + "\n".join(stages) + "\n")


def write_chain_workflow(root: Path, stages: int) -> None:
    """benchmarks/stage_overhead.py's workflow: a chain of trivial stages (one 16-byte file each)."""
    lines = ["name: chain", "stages:"]
    for i in range(stages):
        needs = f", needs: [s{i - 1}]" if i else ""
        lines.append(f"  s{i}: {{uses: testing.write, with: {{files: 1, size: 16, text: s{i}}}{needs}}}")
    (root / "chain.yaml").write_text("\n".join(lines) + "\n")


def vlflow_run(root: Path, workflow: str, cache: str, state: str, env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run([VLFLOW, "run", workflow, "--cache", cache, "--state-dir", state], cwd=root, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"vlflow run {workflow} --cache {cache} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20000, help="artifact files of the first-run workflow (5 stages)")
    parser.add_argument("--stages", type=int, default=100, help="stages of the no-op chain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
                     "load_before": load(), "files": args.files, "stages": args.stages}
    print(f"load average before: {results['load_before']} ({os.cpu_count()} cores)")
    with CountingMotoServer() as moto, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = dict(os.environ, **CREDENTIALS, VLFLOW_S3_ENDPOINT_URL=moto.url, OMP_NUM_THREADS="1")
        env.pop("AWS_PROFILE", None)
        write_files_workflow(root, args.files)
        write_chain_workflow(root, args.stages)

        first: dict[str, list[float]] = {"local": [], "s3": []}
        first_requests = []
        for index in range(args.rounds):
            order = ("local", "s3") if index % 2 == 0 else ("s3", "local")
            for where in order:
                tag = f"first{index}"
                if where == "local":
                    first["local"].append(vlflow_run(root, "files.yaml", str(root / f"cache-{tag}"),
                                                     str(root / f"state-local-{tag}"), env))
                else:
                    moto.take()
                    first["s3"].append(vlflow_run(root, "files.yaml", f"s3://{moto.create_bucket()}/cache",
                                                  str(root / f"state-s3-{tag}"), env))
                    first_requests.append(moto.take())
        local, s3 = statistics.median(first["local"]), statistics.median(first["s3"])
        print(f"first run, 5 stages, {args.files} files: local {local:.2f}s, S3 {s3:.2f}s = {s3 / local:.2f}x "
              f"(goal <= 3x); S3 requests {dict(first_requests[-1])} "
              f"(local {[round(x, 2) for x in first['local']]}, S3 {[round(x, 2) for x in first['s3']]})")
        results["first_run"] = {"local_s": first["local"], "s3_s": first["s3"], "ratio": s3 / local,
                                "s3_requests": dict(first_requests[-1])}

        bucket = moto.create_bucket()
        caches = {"local": (str(root / "cache-chain"), str(root / "state-chain-local")),
                  "s3": (f"s3://{bucket}/cache", str(root / "state-chain-s3"))}
        for cache, state in caches.values():
            vlflow_run(root, "chain.yaml", cache, state, env)  # fill
        noop: dict[str, list[float]] = {"local": [], "s3": []}
        noop_requests = []
        for index in range(args.rounds + 1):
            order = ("local", "s3") if index % 2 == 0 else ("s3", "local")
            for where in order:
                moto.take()
                seconds = vlflow_run(root, "chain.yaml", *caches[where], env)
                if index:  # the first round warms the page cache and writes the state dir's records
                    noop[where].append(seconds)
                if where == "s3":
                    noop_requests.append(moto.take())
        local, s3 = statistics.median(noop["local"]), statistics.median(noop["s3"])
        print(f"no-op run, {args.stages}-stage chain: local {local:.3f}s, S3 {s3:.3f}s = {s3 / local:.2f}x "
              f"(goal <= 1.5x); S3 requests {dict(noop_requests[-1])} "
              f"(local {[round(x, 3) for x in noop['local']]}, S3 {[round(x, 3) for x in noop['s3']]})")
        results["noop_run"] = {"local_s": noop["local"], "s3_s": noop["s3"], "ratio": s3 / local,
                               "s3_requests": dict(noop_requests[-1])}
    results["load_after"] = load()
    print(f"load average after: {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
