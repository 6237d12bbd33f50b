"""Streaming arrow.coco_karpathy and arrow.vqav2 converters vs ViLT's all-in-memory writers: wall time, images/s and
peak RSS.

    .venv/bin/python benchmarks/arrow_convert.py                # 20k images (~3 GB of JPEGs, ~10 min to generate)
    .venv/bin/python benchmarks/arrow_convert.py --images 2000  # quick
    .venv/bin/python benchmarks/arrow_convert.py --case vqa --image-check decode

Generates a synthetic COCO tree with realistic (~150 KB, noisy) JPEGs and VQAv2 question/annotation files about the
same images, then runs each converter in a fresh subprocess that reports its own peak RSS (VmHWM) and CPU time,
and checks that both wrote the same tables (VQA: the same rows per split, ViLT's order being an unseeded shuffle).
The ViLT writers are write_coco_karpathy.py and write_vqa.py with pyarrow's from_pylist in place of the pandas
DataFrame (no pandas here; pandas' from_pandas adds a copy, so the real writers are slower than these).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SPLITS = ("train", "val", "restval", "test")


def convert_streaming(root: Path, out: Path, batch_rows: int, threads: int, image_check: str) -> None:
    from vlflow.stages.data.arrow_coco import convert_coco_karpathy
    from vlflow.stages.data.spec import ArrowParams

    convert_coco_karpathy(root, out, ArrowParams(batch_rows=batch_rows, read_threads=threads,
                                                 image_check=image_check))


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


VQA_SPLITS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test2015"}
VQA_FILES = ("train", "val", "trainable_val", "rest_val")


def convert_vqa_streaming(root: Path, out: Path, batch_rows: int, threads: int, image_check: str) -> None:
    from vlflow.stages.data.arrow_vqa import convert_vqav2
    from vlflow.stages.data.spec import VqaArrowParams

    convert_vqav2(root, out, VqaArrowParams(batch_rows=batch_rows, read_threads=threads, image_check=image_check))


def convert_vqa_in_memory(root: Path, out: Path) -> None:
    """ViLT's write_vqa.py without pandas: all question/annotation files, the answer vocabulary (normalised majority
    answers seen >= 9 times), raw annotator answers looked up, every image of a split in memory, then one table per
    split; trainable_val/rest_val cut from the written val arrow. Absent test question files are skipped (ViLT's
    writer needs them)."""
    import random
    from collections import Counter

    import pyarrow as pa
    from vlflow.stages.data.arrow_vqa import normalize_answer  # = ViLT's glossary.normalize_word (tested)

    questions = {split: json.loads(path.read_text())["questions"] for split, folder in VQA_SPLITS.items()
                 if (path := root / f"v2_OpenEnded_mscoco_{'test-dev2015' if split == 'test-dev' else folder}"
                                    "_questions.json").is_file()}
    annotations = {split: json.loads((root / f"v2_mscoco_{VQA_SPLITS[split]}_annotations.json").read_text())
                   ["annotations"] for split in ("train", "val")}
    per_image = {}
    for split, items in questions.items():
        per_image[split] = defaultdict(dict)
        for q in items:
            per_image[split][q["image_id"]][q["question_id"]] = [q["question"]]
    majority = [normalize_answer(a["multiple_choice_answer"]) for split in ("train", "val")
                for a in annotations[split]]
    label2ans = [k for k, v in Counter(majority).items() if v >= 9]
    ans2label = {k: i for i, k in enumerate(label2ans)}
    for split in ("train", "val"):
        for a in annotations[split]:
            counts = Counter(given["answer"] for given in a["answers"])
            labels = [ans2label[answer] for answer in counts if answer in ans2label]
            scores = [(0.0, 0.3, 0.6, 0.9)[n] if n < 4 else 1.0 for answer, n in counts.items() if answer in ans2label]
            per_image[split][a["image_id"]][a["question_id"]].append({"labels": labels, "scores": scores})
        per_image[split] = {iid: kept for iid, qs in per_image[split].items()
                            if (kept := {qid: qa for qid, qa in qs.items() if qa[1]["labels"]})}
    out.mkdir(parents=True, exist_ok=True)
    for split, annot in per_image.items():
        folder = VQA_SPLITS[split]
        paths = list((root / folder).glob("*.jpg"))
        random.shuffle(paths)
        rows = []
        for path in paths:
            iid = int(path.stem.split("_")[-1])
            if iid not in annot:
                continue
            qas = list(annot[iid].items())
            test = "test" in split
            labels = [] if test else [qa[1]["labels"] for _, qa in qas]
            rows.append({"image": path.read_bytes(), "questions": [qa[0] for _, qa in qas],
                         "answers": [] if test else [[label2ans[x] for x in ls] for ls in labels],
                         "answer_labels": labels, "answer_scores": [] if test else [qa[1]["scores"] for _, qa in qas],
                         "image_id": iid, "question_id": [qid for qid, _ in qas], "split": split})
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(out / f"vqav2_{split}.arrow"), "wb") as sink:
            with pa.RecordBatchFileWriter(sink, table.schema) as writer:
                writer.write_table(table)
    val = pa.ipc.RecordBatchFileReader(pa.memory_map(str(out / "vqav2_val.arrow"), "r")).read_all()
    for name, part in (("trainable_val", val.slice(0, max(0, len(val) - 1000))),
                       ("rest_val", val.slice(max(0, len(val) - 1000)))):
        with pa.OSFile(str(out / f"vqav2_{name}.arrow"), "wb") as sink:
            with pa.RecordBatchFileWriter(sink, part.schema) as writer:
                writer.write_table(part)


CONVERTERS = {("coco", "streaming"): lambda a: convert_streaming(a.root, a.out, a.batch_rows, a.threads, a.image_check),
              ("coco", "in_memory"): lambda a: convert_in_memory(a.root, a.out),
              ("vqa", "streaming"): lambda a: convert_vqa_streaming(a.root, a.out, a.batch_rows, a.threads,
                                                                    a.image_check),
              ("vqa", "in_memory"): lambda a: convert_vqa_in_memory(a.root, a.out)}


def child(args) -> None:
    import pyarrow  # noqa: F401 - imports are not part of the measured conversion time
    import vlflow.stages.data.arrow_coco  # noqa: F401
    import vlflow.stages.data.arrow_vqa  # noqa: F401
    import vlflow.stages.data.spec  # noqa: F401
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    CONVERTERS[(args.case, args.child)](args)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu_s": _cpu_seconds() - cpu_start, "peak_rss_mb": _peak_rss_mb()}))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM. (getrusage's ru_maxrss survives exec, so a child started by a parent
    that had, say, memory-mapped a compared arrow reported the parent's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(case: str, mode: str, root: Path, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--case", case, "--child", mode, "--root", str(root), "--out", str(out),
               "--batch-rows", str(args.batch_rows), "--threads", str(args.threads), "--image-check", args.image_check]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start  # includes interpreter start and imports
    return result


def same_output(case: str, a: Path, b: Path) -> bool:
    import pyarrow as pa

    if case == "vqa":
        return same_vqa_rows(a, b)
    for split in SPLITS:
        name = f"coco_caption_karpathy_{split}.arrow"
        with pa.memory_map(str(a / name)) as fa, pa.memory_map(str(b / name)) as fb:
            if not pa.ipc.open_file(fa).read_all().equals(pa.ipc.open_file(fb).read_all()):
                return False
    return True


def same_vqa_rows(a: Path, b: Path) -> bool:
    """The same rows in train and val (by image; ViLT's order is an unseeded shuffle, so its rest_val is another
    set of images) and the same number of rows in trainable_val + rest_val."""
    import pyarrow as pa

    def table(directory: Path, split: str) -> pa.Table:
        with pa.memory_map(str(directory / f"vqav2_{split}.arrow")) as source:
            return pa.ipc.open_file(source).read_all()

    for split in ("train", "val"):
        ours, theirs = (table(d, split) for d in (a, b))
        ours = ours.sort_by("image_id").to_pylist()
        theirs = theirs.sort_by("image_id").to_pylist()
        if ours != theirs:
            return False
    return all(len(table(d, "trainable_val")) + len(table(d, "rest_val")) == len(table(d, "val")) for d in (a, b))


def _existing_images(root: Path) -> int | None:
    try:
        if not (root / "v2_mscoco_val2014_annotations.json").is_file():
            return None
        return len(json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"])
    except (OSError, ValueError, KeyError):
        return None


def compare(case: str, root: Path, workdir: Path, args) -> None:
    """Modes alternate and the best of --repeat runs counts: the machine may be shared."""
    runs: dict[str, list[dict]] = {"streaming": [], "in_memory": []}
    for _ in range(args.repeat):
        for mode in runs:
            shutil.rmtree(workdir / f"{case}_{mode}", ignore_errors=True)
            runs[mode].append(run_child(case, mode, root, workdir / f"{case}_{mode}", args))
    results = {}
    print(f"{case}: streaming with batch_rows={args.batch_rows}, read_threads={args.threads}, "
          f"image_check={args.image_check}")
    for mode, attempts in runs.items():
        best = min(attempts, key=lambda r: r["seconds"])
        r = results[mode] = {**best, "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts)}
        print(f"{mode:>10}: {r['seconds']:7.2f} s convert ({r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU), "
              f"{args.images / r['seconds']:8.0f} images/s, peak RSS {r['peak_rss_mb']:8.0f} MB "
              f"(runs: {' '.join(format(a['seconds'], '.2f') for a in attempts)} s)")
    s, m = results["streaming"], results["in_memory"]
    # each round runs both back to back, so a round's ratio compares them under about the same load
    paired = sorted(b["seconds"] / a["seconds"] for a, b in zip(runs["streaming"], runs["in_memory"]))
    print(f"{case} in-memory / streaming: time x{m['seconds'] / s['seconds']:.2f} (best of each; per round: "
          f"median x{statistics.median(paired):.2f}, lowest x{paired[0]:.2f}), "
          f"CPU time x{m['cpu_s'] / s['cpu_s']:.2f}, peak RSS x{m['peak_rss_mb'] / s['peak_rss_mb']:.2f}")
    print(f"{case} load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{case} outputs identical:", same_output(case, workdir / f"{case}_streaming", workdir / f"{case}_in_memory"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--jpeg-quality", type=int, default=92)
    parser.add_argument("--noise", type=float, default=22.0)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=4, help="read threads of the streaming converter")
    parser.add_argument("--image-check", choices=("structure", "decode", "headers"), default="structure",
                        help="the streaming converters' image_check (default: theirs)")
    parser.add_argument("--case", choices=("coco", "vqa", "both"), default="both")
    parser.add_argument("--questions-per-image", type=int, default=5, help="VQA questions per synthetic image")
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
                noise=args.noise, noisy_fraction=1.0, vary_aspect=True, threads=args.gen_threads,
                vqa_questions_per_image=args.questions_per_image))
        jpeg_bytes = sum(p.stat().st_size for p in root.glob("*2014/*.jpg"))
        print(f"{args.images} images, mean {jpeg_bytes / args.images / 1e3:.0f} KB "
              f"({jpeg_bytes / 1e6:.0f} MB), ready in {time.perf_counter() - start:.0f} s")

        for case in ("coco", "vqa") if args.case == "both" else (args.case,):
            compare(case, root, workdir, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
