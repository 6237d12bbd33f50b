"""Streaming arrow.vg / arrow.sbu vs ViLT's write_vg.py / write_sbu.py: wall time and peak RSS on the same corpus.

    .venv/bin/python benchmarks/arrow_pretrain_sources.py                       # 5k images per corpus
    .venv/bin/python benchmarks/arrow_pretrain_sources.py --images 1000 --corpus vg

Generates synthetic Visual Genome (`--regions` region descriptions per image; real VG has ~50) and SBU trees with
noisy JPEGs, then runs each converter in a fresh subprocess that reports its own peak RSS (VmHWM),
alternating ViLT's and ours round by round (the machine's load drifts), and checks that both wrote the same rows
(ViLT's order is an unseeded shuffle). ViLT's writers are transcribed with pyarrow's from_pylist in place of pandas
(not installed here; from_pandas adds a copy, so the real writers use more memory than these).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from glob import glob
from pathlib import Path


def write_table(rows: list[dict], path: str) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.OSFile(path, "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)


def vilt_vg(root: str, out: str) -> None:
    """write_vg.make_arrow: the whole json, then every image's bytes in one list, then one table."""
    with open(f"{root}/annotations/region_descriptions.json") as fp:
        captions = json.load(fp)
    iid2captions = defaultdict(list)
    for cap in captions:
        for c in cap["regions"]:
            iid2captions[c["image_id"]].append(c)
    paths = list(glob(f"{root}/images/VG_100K/*.jpg")) + list(glob(f"{root}/images/VG_100K_2/*.jpg"))
    random.shuffle(paths)
    rows = []
    for path in paths:
        iid = int(path.split("/")[-1][:-4])
        if iid in iid2captions:
            c = iid2captions[iid]
            rows.append({"image": open(path, "rb").read(), "caption": [r["phrase"] for r in c],
                         "width": [r["width"] for r in c], "height": [r["height"] for r in c],
                         "x": [r["x"] for r in c], "y": [r["y"] for r in c], "image_id": str(iid)})
    os.makedirs(out, exist_ok=True)
    write_table(rows, f"{out}/vg.arrow")


def vilt_sbu(root: str, out: str) -> None:
    """write_sbu.make_arrow: shards of 100,000 images, each held whole."""
    with open(f"{root}/annot.json") as fp:
        iid2captions = {cap[0].split("/")[-1]: [cap[1]] for cap in json.load(fp)}
    paths = list(glob(f"{root}/images_train/*/*"))
    random.shuffle(paths)
    paths = [p for p in paths if p.split("/")[-1] in iid2captions]
    os.makedirs(out, exist_ok=True)
    for sub in range(len(paths) // 100000 + 1):
        rows = [{"image": open(p, "rb").read(), "caption": iid2captions[p.split("/")[-1]],
                 "image_id": p.split("/")[-1], "split": "train"} for p in paths[sub * 100000:(sub + 1) * 100000]]
        write_table(rows, f"{out}/sbu_{sub}.arrow")


def ours(corpus: str, root: str, out: str) -> None:
    from vlflow.stages.data.arrow_vg import convert_vg
    from vlflow.stages.data.arrow_webcaps import convert_sbu
    from vlflow.stages.data.spec import ArrowParams, WebCaptionArrowParams

    if corpus == "vg":
        convert_vg(Path(root), Path(out), ArrowParams())
    else:
        convert_sbu(Path(root), Path(out), WebCaptionArrowParams())


def child(args) -> None:
    import pyarrow  # noqa: F401  (imports are not timed)
    from vlflow.stages.data import arrow_vg, arrow_webcaps, spec  # noqa: F401

    start = time.perf_counter()
    if args.child == "vilt":
        (vilt_vg if args.corpus == "vg" else vilt_sbu)(str(args.root), str(args.out))
    else:
        ours(args.corpus, str(args.root), str(args.out))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec: VmHWM (ru_maxrss survives execve, so a child forked from a big parent
    would report the parent's size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows_by_id(directory: Path) -> dict:
    import pyarrow as pa

    rows = {}
    for path in sorted(directory.glob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            for row in pa.ipc.open_file(source).read_all().to_pylist():
                rows[row["image_id"]] = row
    return rows


def generate(corpus: str, root: Path, args) -> None:
    from vlflow.stages.data.spec import SyntheticSbuParams, SyntheticVgParams
    from vlflow.stages.data.synthetic import generate_sbu, generate_vg

    common = dict(num_images=args.images, image_size=args.image_size, noise=args.noise, noisy_fraction=1.0,
                  jpeg_quality=args.jpeg_quality, threads=args.gen_threads)
    if corpus == "vg":
        generate_vg(root, SyntheticVgParams(**common, captions_per_image=args.regions))
    else:
        generate_sbu(root, SyntheticSbuParams(**common))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("vg", "sbu", "both"), default="both")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--regions", type=int, default=20, help="VG region descriptions per image (max 20)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--jpeg-quality", type=int, default=92)
    parser.add_argument("--noise", type=float, default=22.0)
    parser.add_argument("--gen-threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per converter (best time, max RSS)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated corpora here (reused)")
    parser.add_argument("--child", choices=("vilt", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.corpus = "vg" if (args.root / "annotations").is_dir() else "sbu"
        return child(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlflow-pretrain-bench-"))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for corpus in (("vg", "sbu") if args.corpus == "both" else (args.corpus,)):
        root = workdir / f"{corpus}_{args.images}"
        if not root.is_dir():
            start = time.perf_counter()
            generate(corpus, root, args)
            print(f"generated {corpus} ({args.images} images) in {time.perf_counter() - start:.0f}s")
        results: dict[str, list[dict]] = {"vilt": [], "ours": []}
        for _ in range(args.rounds):
            for mode in ("vilt", "ours"):
                out = workdir / f"out_{corpus}_{mode}"
                shutil.rmtree(out, ignore_errors=True)
                done = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--out",
                                       str(out)], check=True, capture_output=True, text=True)
                results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        same = rows_by_id(workdir / f"out_{corpus}_vilt") == rows_by_id(workdir / f"out_{corpus}_ours")
        best = {mode: min(r["seconds"] for r in runs) for mode, runs in results.items()}
        rss = {mode: max(r["peak_rss_mib"] for r in runs) for mode, runs in results.items()}
        print(f"{corpus}: ViLT {best['vilt']:.2f}s {rss['vilt']:.0f} MiB | ours {best['ours']:.2f}s "
              f"{rss['ours']:.0f} MiB | speed-up {best['vilt'] / best['ours']:.2f}x | same rows: {same}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
