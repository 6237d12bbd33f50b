"""Streaming arrow.coco_karpathy converter vs ViLT's all-in-memory writer: wall time, images/s and peak RSS.

    .venv/bin/python benchmarks/arrow_convert.py                # 20k images (~3 GB of JPEGs, ~5 min to generate)
    .venv/bin/python benchmarks/arrow_convert.py --images 2000  # quick

Generates a synthetic COCO tree with realistic (~150 KB, noisy) JPEGs, then runs each converter in a fresh
subprocess that reports its own peak RSS (getrusage RUSAGE_SELF), and checks that both wrote the same tables.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SPLITS = ("train", "val", "restval", "test")


def convert_streaming(root: Path, out: Path, batch_rows: int, threads: int) -> None:
    from vlflow.stages.data.arrow_coco import convert_coco_karpathy
    from vlflow.stages.data.spec import ArrowParams

    convert_coco_karpathy(root, out, ArrowParams(batch_rows=batch_rows, read_threads=threads))


def convert_in_memory(root: Path, out: Path) -> None:
    """ViLT's write_coco_karpathy.py without pandas: every image in a list of rows, then one table per split."""
    import pyarrow as pa

    images = json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
    iid2captions, iid2split = defaultdict(list), {}
    for cap in images:
        iid2split[cap["filename"]] = cap["split"]
        for c in cap["sentences"]:
            iid2captions[cap["filename"]].append(c["raw"])
    paths = [root / cap["filepath"] / cap["filename"] for cap in images]
    bs = [[p.read_bytes(), iid2captions[p.name], p.name, iid2split[p.name]] for p in paths if p.name in iid2captions]
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        batches = [b for b in bs if b[-1] == split]
        table = pa.Table.from_pylist([dict(zip(["image", "caption", "image_id", "split"], b)) for b in batches])
        with pa.OSFile(str(out / f"coco_caption_karpathy_{split}.arrow"), "wb") as sink:
            with pa.RecordBatchFileWriter(sink, table.schema) as writer:
                writer.write_table(table)


def child(args) -> None:
    import pyarrow  # noqa: F401 - imports are not part of the measured conversion time

    if args.child == "streaming":
        import vlflow.stages.data.arrow_coco  # noqa: F401
        import vlflow.stages.data.spec  # noqa: F401
    start = time.perf_counter()
    if args.child == "streaming":
        convert_streaming(args.root, args.out, args.batch_rows, args.threads)
    else:
        convert_in_memory(args.root, args.out)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kib / 1024}))


def run_child(mode: str, root: Path, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--root", str(root), "--out", str(out),
               "--batch-rows", str(args.batch_rows), "--threads", str(args.threads)]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start  # includes interpreter start and imports
    return result


def same_output(a: Path, b: Path) -> bool:
    import pyarrow as pa

    for split in SPLITS:
        name = f"coco_caption_karpathy_{split}.arrow"
        with pa.memory_map(str(a / name)) as fa, pa.memory_map(str(b / name)) as fb:
            if not pa.ipc.open_file(fa).read_all().equals(pa.ipc.open_file(fb).read_all()):
                return False
    return True


def _existing_images(root: Path) -> int | None:
    try:
        return len(json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"])
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--jpeg-quality", type=int, default=92)
    parser.add_argument("--noise", type=float, default=22.0)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=4, help="read threads of the streaming converter")
    parser.add_argument("--gen-threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per converter (best time, max RSS)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="kept (and its images reused) when given; default: a temporary dir, removed afterwards")
    parser.add_argument("--child", choices=("streaming", "in_memory"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from vlflow.stages.data.spec import SyntheticCocoParams
    from vlflow.stages.data.synthetic import generate_coco

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlflow-arrow-bench-"))
    try:
        root = workdir / "coco"
        start = time.perf_counter()
        if _existing_images(root) == args.images:  # a kept --workdir from an earlier run
            print(f"reusing {args.images} images in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            generate_coco(root, SyntheticCocoParams(
                num_images=args.images, image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                noise=args.noise, noisy_fraction=1.0, vary_aspect=True, threads=args.gen_threads))
        jpeg_bytes = sum(p.stat().st_size for p in root.glob("*2014/*.jpg"))
        print(f"{args.images} images, mean {jpeg_bytes / args.images / 1e3:.0f} KB "
              f"({jpeg_bytes / 1e6:.0f} MB), ready in {time.perf_counter() - start:.0f} s; "
              f"streaming with batch_rows={args.batch_rows}, read_threads={args.threads}")

        # Modes alternate and the best of --repeat runs counts: the machine may be shared.
        runs: dict[str, list[dict]] = {"streaming": [], "in_memory": []}
        for _ in range(args.repeat):
            for mode in runs:
                shutil.rmtree(workdir / mode, ignore_errors=True)
                runs[mode].append(run_child(mode, root, workdir / mode, args))
        results = {}
        for mode, attempts in runs.items():
            best = min(attempts, key=lambda r: r["seconds"])
            r = results[mode] = {**best, "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts)}
            print(f"{mode:>10}: {r['seconds']:7.2f} s convert ({r['wall_s']:.2f} s wall), "
                  f"{args.images / r['seconds']:8.0f} images/s, peak RSS {r['peak_rss_mb']:8.0f} MB "
                  f"(runs: {' '.join(format(a['seconds'], '.2f') for a in attempts)} s)")
        s, m = results["streaming"], results["in_memory"]
        print(f"in-memory / streaming: time x{m['seconds'] / s['seconds']:.2f}, "
              f"peak RSS x{m['peak_rss_mb'] / s['peak_rss_mb']:.2f}")
        print("outputs identical:", same_output(workdir / "streaming", workdir / "in_memory"))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
