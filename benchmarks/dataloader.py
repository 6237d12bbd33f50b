"""vlflow's ViLT input pipeline vs ViLT's BaseDataset + collate, on the same arrows: items/s and identical tensors.

    .venv/bin/python benchmarks/dataloader.py                    # 1,000 COCO-layout images (512 px JPEGs), 2 workers
    .venv/bin/python benchmarks/dataloader.py --workers 0 2 4 --batches 30

Three measurements, each alternating the two pipelines over the same batches (the best of --repeat runs counts),
torch at one thread. Each is reported per core (items per CPU second of the process and its DataLoader workers: what
a core delivers, robust on a shared machine) and per wall second:
1. `__getitem__`: one process decoding, resizing and tokenising items (ViLT: PIL decode, convert, MinMaxResize,
   ToTensor, Normalize, per-item tokenisation padded to max_text_len; vlflow: uint8 pixels, text left for collate);
2. + collate into batches of --batch-size with whole-word masking (ViLT: its collate with transformers'
   DataCollatorForWholeWordMask; vlflow: PairCollator + the pretraining step's host-side `prepare`, i.e. MLM masks
   and ITM negative indices, exactly what the training loop runs before moving the batch to the device);
3. through a DataLoader with N worker processes (vlflow's `prepare` runs in the main process, as in training).
Plus measurement 2 as both pretrain by default for ITM: ViLT's dataset with draw_false_image=1 (a second image
decoded per item) against vlflow's `CaptionPairs(false_images=True)` (`itm_negatives: dataset`, the same draw; items
keyed by (index, item seed) as ResumableSampler gives them).

vlflow runs twice in each measurement, alternating with ViLT: `exact` (the default `PixelDecoding`: PIL as ViLT, its
pixels bit for bit) and `fast` (libjpeg-turbo through torchvision + torch's uint8 antialiased bicubic; pixels within
transforms.FAST_PIXEL_TOLERANCE of ViLT's, checked in the run).

The baseline reimplements ViLT's steps (dandelin/ViLT vilt/datasets/base_dataset.py, vilt/transforms/pixelbert.py)
without pytorch-lightning, as benchmarks/arrow_convert.py does for make_arrow: caption pairs from the index mapper
(captions de-duplicated with list(set(...)) as ViLT does), draw_false_image=0 except in the reference line. Both use
the same fast WordPiece tokenizer (trained on the captions here: no network; ViLT itself uses the slower Python
BertTokenizer). Before timing, the outputs are compared batch by batch: vlflow's uint8 batch normalised (as the
training step does on the device) equals ViLT's float image batch bit for bit (`fast`: within the tolerance, max and
mean differences printed), the pixel mask marks exactly each item's resized image, and token ids and attention masks
are equal. MLM masks are random draws from different generators in the two (python `random` vs a torch.Generator),
so they are checked for validity, not equality.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ARROW_SPLITS = ("train", "restval")  # what vilt.* training reads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer is used before DataLoader workers fork


# ---------------------------------------------------------------------------------------------------------------
# ViLT's steps (the baseline)

class MinMaxResize:
    """ViLT's vilt/transforms/utils.py MinMaxResize."""

    def __init__(self, shorter=800, longer=1333):
        self.min, self.max = shorter, longer

    def __call__(self, x):
        from PIL import Image

        w, h = x.size
        scale = self.min / min(w, h)
        if h < w:
            newh, neww = self.min, scale * w
        else:
            newh, neww = scale * h, self.min
        if max(newh, neww) > self.max:
            scale = self.max / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        newh, neww = int(newh + 0.5), int(neww + 0.5)
        newh, neww = newh // 32 * 32, neww // 32 * 32
        return x.resize((neww, newh), resample=Image.BICUBIC)


def vilt_pixelbert_transform(size=800):
    """ViLT's vilt/transforms/pixelbert.py pixelbert_transform (inception_normalize = Normalize(0.5, 0.5))."""
    from torchvision import transforms

    longer = int((1333 / 800) * size)
    return transforms.Compose([MinMaxResize(shorter=size, longer=longer), transforms.ToTensor(),
                               transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])


class ViltBaseDataset(torch.utils.data.Dataset):
    """ViLT's BaseDataset for caption arrows (image + text, no false images/texts), the steps of its
    __init__, get_raw_image, get_image, get_text and collate."""

    def __init__(self, data_dir: Path, names: list[str], tokenizer, image_size=384, max_text_len=40,
                 draw_false_image=0):
        import pyarrow as pa

        self.draw_false_image = draw_false_image

        self.transforms = [vilt_pixelbert_transform(size=image_size)]
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        tables = [pa.ipc.RecordBatchFileReader(pa.memory_map(f"{data_dir}/{name}.arrow", "r")).read_all()
                  for name in names]
        self.table = pa.concat_tables(tables, promote_options="default")
        # ViLT: self.table["caption"].to_pandas().tolist() (pandas is not installed here: same lists)
        self.all_texts = [list(set(texts)) for texts in self.table["caption"].to_pylist()]
        self.index_mapper = {}
        j = 0
        for i, texts in enumerate(self.all_texts):
            for _j in range(len(texts)):
                self.index_mapper[j] = (i, _j)
                j += 1

    def __len__(self):
        return len(self.index_mapper)

    def get_raw_image(self, index, image_key="image"):
        from PIL import Image

        index, caption_index = self.index_mapper[index]
        image_bytes = io.BytesIO(self.table[image_key][index].as_py())
        image_bytes.seek(0)
        return Image.open(image_bytes).convert("RGB")

    def get_image(self, index, image_key="image"):
        image = self.get_raw_image(index, image_key=image_key)
        image_tensor = [tr(image) for tr in self.transforms]
        return {"image": image_tensor, "img_index": self.index_mapper[index][0],
                "cap_index": self.index_mapper[index][1], "raw_index": index}

    def get_false_image(self, rep, image_key="image"):
        random_index = random.randint(0, len(self.index_mapper) - 1)
        image = self.get_raw_image(random_index, image_key=image_key)
        image_tensor = [tr(image) for tr in self.transforms]
        return {f"false_image_{rep}": image_tensor}

    def get_text(self, raw_index):
        index, caption_index = self.index_mapper[raw_index]
        text = self.all_texts[index][caption_index]
        encoding = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_text_len,
                                  return_special_tokens_mask=True)
        return {"text": (text, encoding), "img_index": index, "cap_index": caption_index, "raw_index": raw_index}

    def __getitem__(self, index):  # get_suite without false texts
        ret = dict()
        ret.update(self.get_image(index))
        txt = self.get_text(index)
        ret.update({"replica": True if txt["cap_index"] > 0 else False})
        ret.update(txt)
        for i in range(self.draw_false_image):
            ret.update(self.get_false_image(i))
        return ret

    @staticmethod
    def collate(batch, mlm_collator):
        batch_size = len(batch)
        keys = set([key for b in batch for key in b.keys()])
        dict_batch = {k: [dic[k] if k in dic else None for dic in batch] for k in keys}
        img_keys = [k for k in list(dict_batch.keys()) if "image" in k]
        img_sizes = list()
        for img_key in img_keys:
            img = dict_batch[img_key]
            img_sizes += [ii.shape for i in img if i is not None for ii in i]
        for size in img_sizes:
            assert len(size) == 3
        if len(img_keys) != 0:
            max_height = max([i[1] for i in img_sizes])
            max_width = max([i[2] for i in img_sizes])
        for img_key in img_keys:
            img = dict_batch[img_key]
            view_size = len(img[0])
            new_images = [torch.zeros(batch_size, 3, max_height, max_width) for _ in range(view_size)]
            for bi in range(batch_size):
                orig_batch = img[bi]
                for vi in range(view_size):
                    if orig_batch is None:
                        new_images[vi][bi] = None
                    else:
                        orig = img[bi][vi]
                        new_images[vi][bi, :, : orig.shape[1], : orig.shape[2]] = orig
            dict_batch[img_key] = new_images
        txt_keys = [k for k in list(dict_batch.keys()) if "text" in k]
        if len(txt_keys) != 0:
            encodings = [[d[1] for d in dict_batch[txt_key]] for txt_key in txt_keys]
            flatten_encodings = [e for encoding in encodings for e in encoding]
            flatten_mlms = mlm_collator(flatten_encodings)
            for i, txt_key in enumerate(txt_keys):
                texts, encodings = ([d[0] for d in dict_batch[txt_key]], [d[1] for d in dict_batch[txt_key]])
                mlm_ids, mlm_labels = (flatten_mlms["input_ids"][batch_size * i: batch_size * (i + 1)],
                                       flatten_mlms["labels"][batch_size * i: batch_size * (i + 1)])
                input_ids = torch.zeros_like(mlm_ids)
                attention_mask = torch.zeros_like(mlm_ids)
                for _i, encoding in enumerate(encodings):
                    _input_ids, _attention_mask = (torch.tensor(encoding["input_ids"]),
                                                   torch.tensor(encoding["attention_mask"]))
                    input_ids[_i, : len(_input_ids)] = _input_ids
                    attention_mask[_i, : len(_attention_mask)] = _attention_mask
                dict_batch[txt_key] = texts
                dict_batch[f"{txt_key}_ids"] = input_ids
                dict_batch[f"{txt_key}_labels"] = torch.full_like(input_ids, -100)
                dict_batch[f"{txt_key}_ids_mlm"] = mlm_ids
                dict_batch[f"{txt_key}_labels_mlm"] = mlm_labels
                dict_batch[f"{txt_key}_masks"] = attention_mask
        return dict_batch


def vilt_mlm_collator(tokenizer):
    """ViLT's datamodule: DataCollatorForWholeWordMask(tokenizer, mlm=True, mlm_probability=0.15)."""
    import warnings

    from transformers import DataCollatorForWholeWordMask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of DataCollatorForLanguageModeling
        return DataCollatorForWholeWordMask(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)


# ---------------------------------------------------------------------------------------------------------------
# The two pipelines over the same pairs

class Pipelines:
    def __init__(self, arrows: Path, tokenizer, image_size: int, max_text_len: int):
        from vlflow.stages.data.transforms import PixelDecoding
        from vlflow.stages.vilt.data import CaptionPairs, PairCollator, image_dataset
        from vlflow.stages.vilt.train import pretrain_task

        self.vilt = ViltBaseDataset(arrows, [f"coco_caption_karpathy_{s}" for s in ARROW_SPLITS], tokenizer,
                                    image_size, max_text_len)
        self.vilt_collate = partial(ViltBaseDataset.collate, mlm_collator=vilt_mlm_collator(tokenizer))
        # ViLT's pretraining configuration (MLM + ITM): a false image decoded per item for ITM
        self.vilt_itm = ViltBaseDataset(arrows, [f"coco_caption_karpathy_{s}" for s in ARROW_SPLITS], tokenizer,
                                        image_size, max_text_len, draw_false_image=1)
        self.ours = CaptionPairs(image_dataset(arrows, "train", image_size, None))
        self.ours_fast = CaptionPairs(image_dataset(arrows, "train", image_size, None, PixelDecoding.fast))
        self.ours_itm = CaptionPairs(self.ours.images, false_images=True)
        self.ours_itm_fast = CaptionPairs(self.ours_fast.images, false_images=True)
        self.ours_collate = PairCollator(tokenizer, max_text_len, normalize=False, pad_to_max_length=True)
        self.prepare = pretrain_task(tokenizer, ["mlm", "itm"], 0.15, True, 0.0).prepare
        # ViLT's index -> our index of the same (image, caption): ViLT de-duplicates captions through a set
        ours_index = {}
        for index, (image, caption) in enumerate(self.ours.pairs):
            ours_index.setdefault((image, self.ours.images.captions(image)[caption]), index)
        self.to_ours = [ours_index[(i, self.vilt.all_texts[i][j])] for i, j in
                        (self.vilt.index_mapper[k] for k in range(len(self.vilt)))]

    def batches(self, count: int, batch_size: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
        """`count` random batches of ViLT indices and the same pairs as our indices."""
        order = torch.randperm(len(self.vilt), generator=torch.Generator().manual_seed(seed)).tolist()
        vilt = [order[b * batch_size:(b + 1) * batch_size] for b in range(count)]
        return vilt, [[self.to_ours[i] for i in batch] for batch in vilt]


def check_identical(p: Pipelines, vilt_batches, our_batches) -> dict[str, float]:
    """Asserts the pipelines give the same tensors (`fast` pixels: within the stated tolerance); returns the number
    of batches compared and the fast path's largest and mean pixel differences (uint8 levels)."""
    from vlflow.stages.data.transforms import FAST_PIXEL_TOLERANCE, normalize_pixels

    largest, total, values = 0, 0, 0
    for vilt_indices, our_indices in zip(vilt_batches, our_batches):
        vilt_items = [p.vilt[i] for i in vilt_indices]
        vilt = p.vilt_collate(vilt_items)
        ours = p.ours_collate([p.ours[i] for i in our_indices])
        pixels = normalize_pixels(ours["pixel_values"], ours["pixel_mask"])  # the training step does it on the device
        assert torch.equal(pixels, vilt["image"][0]), "images differ"
        fast = p.ours_collate([p.ours_fast[i] for i in our_indices])
        assert torch.equal(fast["pixel_mask"], ours["pixel_mask"]), "fast pixel masks differ"
        # ViLT's floats back to uint8 levels (x * 127.5 + 127.5 is exact for its values)
        levels = (vilt["image"][0] * 127.5 + 127.5).round().to(torch.int16)
        real = ours["pixel_mask"].unsqueeze(1).expand_as(levels)  # not the batch padding
        difference = (fast["pixel_values"].to(torch.int16) - levels).abs()[real]
        largest = max(largest, int(difference.max()))
        total, values = total + int(difference.sum()), values + difference.numel()
        assert largest <= FAST_PIXEL_TOLERANCE.max_levels, f"fast pixels differ by {largest} levels"
        for row, item in enumerate(vilt_items):
            _, height, width = item["image"][0].shape
            expected = torch.zeros(pixels.shape[-2:], dtype=torch.bool)
            expected[:height, :width] = True
            assert torch.equal(ours["pixel_mask"][row], expected), "pixel masks differ"
        assert torch.equal(ours["input_ids"], vilt["text_ids"]), "token ids differ"
        assert torch.equal(ours["attention_mask"], vilt["text_masks"]), "attention masks differ"
        prepared = p.prepare(ours, torch.Generator().manual_seed(0))
        for ids, labels, masked in ((vilt["text_ids"], vilt["text_labels_mlm"], vilt["text_ids_mlm"]),
                                    (ours["input_ids"], prepared["mlm_labels"], prepared["mlm_input_ids"])):
            chosen = labels != -100
            assert torch.equal(labels[chosen], ids[chosen]), "MLM labels are not the original tokens"
            assert torch.equal(masked[~chosen], ids[~chosen]), "MLM changed unchosen tokens"
    assert total / values <= FAST_PIXEL_TOLERANCE.mean_levels, f"fast pixels differ by {total / values} on average"
    return {"batches": len(vilt_batches), "fast_max_levels": largest, "fast_mean_levels": total / values}


# ---------------------------------------------------------------------------------------------------------------
# Timing

def cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for (DataLoader workers are joined when
    their iterator ends): the cores' work, whatever else runs on the machine."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(run, items: int) -> tuple[float, float]:
    """(items per wall second, items per CPU second)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return items / (time.perf_counter() - wall), items / (cpu_seconds() - cpu)


def getitem_runs(p: Pipelines, vilt_batches, our_batches):
    vilt_items = [i for b in vilt_batches for i in b]
    our_items = [i for b in our_batches for i in b]
    return {"vilt": (lambda: [p.vilt[i] for i in vilt_items], len(vilt_items)),
            "vlflow": (lambda: [p.ours[i] for i in our_items], len(our_items)),
            "vlflow_fast": (lambda: [p.ours_fast[i] for i in our_items], len(our_items))}


def collate_runs(p: Pipelines, vilt_batches, our_batches):
    def vilt():
        for batch in vilt_batches:
            p.vilt_collate([p.vilt[i] for i in batch])

    def ours(dataset):
        for index, batch in enumerate(our_batches):
            p.prepare(p.ours_collate([dataset[i] for i in batch]), torch.Generator().manual_seed(index))

    items = sum(len(b) for b in vilt_batches)
    return {"vilt": (vilt, items), "vlflow": (partial(ours, p.ours), items),
            "vlflow_fast": (partial(ours, p.ours_fast), items)}


def pretraining_runs(p: Pipelines, vilt_batches, our_batches):
    """As collate_runs, with a false image decoded per item for ITM on both sides (ViLT's draw_false_image=1,
    vlflow's `CaptionPairs(false_images=True)`)."""
    def vilt():
        for batch in vilt_batches:
            p.vilt_collate([p.vilt_itm[i] for i in batch])

    def ours(dataset):
        for index, batch in enumerate(our_batches):
            items = [dataset[(i, index * len(batch) + position)] for position, i in enumerate(batch)]
            p.prepare(p.ours_collate(items), torch.Generator().manual_seed(index))

    items = sum(len(b) for b in vilt_batches)
    return {"vilt": (vilt, items), "vlflow": (partial(ours, p.ours_itm), items),
            "vlflow_fast": (partial(ours, p.ours_itm_fast), items)}


def loader_runs(p: Pipelines, vilt_batches, our_batches, workers: int, pin_memory: bool):
    from torch.utils.data import DataLoader

    def vilt():
        loader = DataLoader(p.vilt, batch_sampler=vilt_batches, collate_fn=p.vilt_collate, num_workers=workers,
                            pin_memory=pin_memory)
        for _ in loader:
            pass

    def ours(dataset):
        loader = DataLoader(dataset, batch_sampler=our_batches, collate_fn=p.ours_collate, num_workers=workers,
                            pin_memory=pin_memory)
        for index, batch in enumerate(loader):  # the training loop's host-side step
            p.prepare(batch, torch.Generator().manual_seed(index))

    items = sum(len(b) for b in vilt_batches)
    return {"vilt": (vilt, items), "vlflow": (partial(ours, p.ours), items),
            "vlflow_fast": (partial(ours, p.ours_fast), items)}


def best_of(runs: dict, repeat: int) -> dict[str, dict[str, float]]:
    results = {name: {"wall": 0.0, "cpu": 0.0} for name in runs}
    for _ in range(repeat):
        for name, (run, items) in runs.items():  # alternating: a busy moment hits both
            wall, cpu = measure(run, items)
            results[name] = {"wall": max(results[name]["wall"], wall), "cpu": max(results[name]["cpu"], cpu)}
    return results


def report(label: str, results: dict) -> dict:
    vilt = results["vilt"]
    figures = dict(results)
    for name, mode in (("vlflow", "exact"), ("vlflow_fast", "fast")):
        ours = results[name]
        ratios = {kind: ours[kind] / vilt[kind] for kind in ("cpu", "wall")}
        print(f"{label:<34} per core (items/CPU-s): ViLT {vilt['cpu']:6.1f}  vlflow {mode:<5} {ours['cpu']:6.1f}  "
              f"x{ratios['cpu']:.2f}   wall items/s: ViLT {vilt['wall']:6.1f}  vlflow {ours['wall']:6.1f}  "
              f"x{ratios['wall']:.2f}", flush=True)
        suffix = "" if mode == "exact" else "_fast"
        figures.update({f"ratio_per_core{suffix}": ratios["cpu"], f"ratio_wall{suffix}": ratios["wall"]})
    return figures


# ---------------------------------------------------------------------------------------------------------------

def make_arrows(workdir: Path, images: int, image_size: int) -> Path:
    from vlflow.stages.data.arrow_coco import convert_coco_karpathy
    from vlflow.stages.data.spec import ArrowParams, SyntheticCocoParams
    from vlflow.stages.data.synthetic import generate_coco

    arrows = workdir / "arrows"
    marker = arrows / "bench.json"
    wanted = {"images": images, "image_size": image_size}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return arrows
    shutil.rmtree(workdir / "coco", ignore_errors=True)
    shutil.rmtree(arrows, ignore_errors=True)
    threads = max(1, min(16, (os.cpu_count() or 2) - 1))  # the images do not depend on it
    generate_coco(workdir / "coco", SyntheticCocoParams(num_images=images, image_size=image_size, jpeg_quality=92,
                                                        noise=22.0, noisy_fraction=1.0, vary_aspect=True,
                                                        threads=threads))
    convert_coco_karpathy(workdir / "coco", arrows, ArrowParams())
    marker.write_text(json.dumps(wanted))
    return arrows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=512, help="longer side of the generated JPEGs")
    parser.add_argument("--size", type=int, default=384, help="ViLT's shorter side after resize")
    parser.add_argument("--max-text-len", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed run")
    parser.add_argument("--check-batches", type=int, default=4, help="batches compared tensor by tensor")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader worker counts to time")
    parser.add_argument("--pin-memory", action="store_true", help="pin batches (meaningful with a GPU)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="kept (and its arrows reused) when given; default: a temporary dir, removed afterwards")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(0)  # ViLT's whole-word masking draws from python's random
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlflow-dataloader-bench-"))
    try:
        from vlflow.stages.data.reader import CaptionArrowDataset
        from vlflow.stages.text.tokenizer import train_wordpiece

        start = time.perf_counter()
        arrows = make_arrows(workdir, args.images, args.image_size)
        captions = CaptionArrowDataset([arrows / f"coco_caption_karpathy_{s}.arrow" for s in ARROW_SPLITS])
        tokenizer = train_wordpiece((c for i in range(len(captions)) for c in captions.captions(i)), vocab_size=400,
                                    lowercase=True, min_frequency=1)
        pipelines = Pipelines(arrows, tokenizer, args.size, args.max_text_len)
        print(f"{len(pipelines.vilt)} caption pairs over {len(captions)} training images ({arrows}), ready in "
              f"{time.perf_counter() - start:.0f} s; batch {args.batch_size}, {args.batches} batches per run, "
              f"best of {args.repeat}", flush=True)

        vilt_batches, our_batches = pipelines.batches(args.batches, args.batch_size)
        checked = check_identical(pipelines, *pipelines.batches(args.check_batches, args.batch_size, seed=1))
        print(f"outputs identical: {checked['batches']} batches of {args.batch_size} (images bit for bit, pixel "
              f"masks, token ids, attention masks; MLM labels valid); fast pixels: max |diff| "
              f"{checked['fast_max_levels']} levels, mean {checked['fast_mean_levels']:.4f}", flush=True)

        figures = {"getitem": report("__getitem__ (1 process)",
                                     best_of(getitem_runs(pipelines, vilt_batches, our_batches), args.repeat)),
                   "collate": report("+ collate, whole-word MLM, ITM",
                                     best_of(collate_runs(pipelines, vilt_batches, our_batches), args.repeat))}
        figures["pretraining_itm"] = report("+ collate, false image per item",
                                           best_of(pretraining_runs(pipelines, vilt_batches, our_batches),
                                                   args.repeat))
        for workers in args.workers:
            runs = loader_runs(pipelines, vilt_batches, our_batches, workers, args.pin_memory)
            figures[f"loader_{workers}"] = report(f"DataLoader, {workers} workers", best_of(runs, args.repeat))
        if args.json:
            args.json.write_text(json.dumps({"check": checked, **figures}, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
