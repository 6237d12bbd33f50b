"""Synthetic "coloured shapes" datasets written in the real COCO 2014 / Flickr30k layouts.

Each image shows 1-3 coloured shapes in distinct cells of a 3x3 grid; captions describe them with varied templates
(colour, shape, absolute position, pairwise relation), so retrieval and phrase grounding are learnable without being
trivial (a caption often mentions only some shapes). Everything is derived from `seed`: the scene plan is drawn
sequentially from one RNG, and each image's pixels from an RNG seeded with (seed, index), so the bytes do not depend
on the number of render threads.
"""
from __future__ import annotations

import json
import math
import random
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # (row, col) of the 3x3 grid -> words
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
RELATIONS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
ASPECTS = (0.75, 1.0, 4 / 3)  # height / width, like landscape / square / portrait photos

# (min shapes, max shapes, template). {aK}/{theK}: entity phrase of the K-th mentioned shape; {pK}: its position;
# {rJK}: relation of shape J to shape K; {all}: every shape listed as entities; {bg}, {n}, {shapes}: scene words.
TEMPLATES = (
    (2, 3, "{a0} {r01} {a1}"),
    (1, 3, "there is {a0} {p0}"),
    (1, 3, "{all} on a {bg} background"),
    (2, 3, "{the0} is {r01} {the1}"),
    (1, 3, "{p0} there is {a0}"),
    (1, 3, "an image with {n} {shapes}: {all}"),
    (2, 3, "{a0} {p0} and {a1} {p1}"),
    (1, 1, "just one shape, {a0}, {p0}"),
    (3, 3, "{a0}, {a1} and {a2}, with {the0} {p0}"),
    (1, 3, "{all}"),
    (2, 3, "{a1} and {a0}, {the0} {r01} {the1}"),
    (1, 3, "a {bg} picture showing {a0}"),
)
# caption_style "complete": every caption names every shape with its colour and grid position (in a random order),
# so each caption describes its image fully; the variety comes from the order, the clause form and the opening.
COMPLETE_OPENINGS = ("", "there is ", "an image with ", "a {bg} picture showing ", "{n} {shapes}: ")
COMPLETE_CLAUSES = ("{a%d} {p%d}", "{p%d} {a%d}")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    index: int
    width: int
    height: int
    background: str  # "plain" | "noisy"
    background_rgb: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Caption:
    text: str  # raw caption, capitalised, with the final punctuation
    spans: tuple[tuple[int, int, int], ...]  # (shape index in the scene, start, end) of each entity phrase


# ---------------------------------------------------------------------------------------------------------------
# Scene planning and captions (pure functions of the RNG).


def plan_scenes(num_images: int, image_size: int, seed: int, noisy_fraction: float = 0.5,
                vary_aspect: bool = False) -> list[Scene]:
    rng = random.Random(seed)
    seen: set = set()
    scenes = []
    for index in range(num_images):
        for _attempt in range(50):  # retries keep every image's shape layout unique (while possible)
            scene = _random_scene(rng, index, image_size, noisy_fraction, vary_aspect)
            signature = frozenset((s.colour, s.kind, s.row, s.col) for s in scene.shapes)
            if signature not in seen:
                break
        seen.add(signature)
        scenes.append(scene)
    return scenes


def _random_scene(rng: random.Random, index: int, image_size: int, noisy_fraction: float,
                  vary_aspect: bool) -> Scene:
    width = image_size
    height = int(round(image_size * rng.choice(ASPECTS))) if vary_aspect else image_size
    count = rng.choices((1, 2, 3), weights=(0.25, 0.4, 0.35))[0]
    cells = rng.sample(sorted(POSITIONS), count)
    kinds = rng.sample([(c, k) for c in COLOURS for k in SHAPES], count)  # no two identical shapes in one image
    cell_w, cell_h = width / 3, height / 3
    shapes = []
    for (row, col), (colour, kind) in zip(cells, kinds):
        side = rng.uniform(0.5, 0.85) * min(cell_w, cell_h)
        x1 = col * cell_w + rng.uniform(0, cell_w - side)
        y1 = row * cell_h + rng.uniform(0, cell_h - side)
        box = (int(x1), int(y1), int(x1 + side), int(y1 + side))
        shapes.append(Shape(colour, kind, row, col, box))
    background = "noisy" if rng.random() < noisy_fraction else "plain"
    background_rgb = tuple(rng.randint(200, 250) for _ in range(3))
    return Scene(index, width, height, background, background_rgb, tuple(shapes))


def _relation(a: Shape, b: Shape, rng: random.Random) -> str:
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(bx - ax) >= abs(by - ay):
        key = "left" if bx > ax else "right"
    else:
        key = "above" if by > ay else "below"
    return rng.choice(RELATIONS[key])


def _render_template(template: str, order: list[int], scene: Scene, rng: random.Random) -> tuple[str, list]:
    """Fill a template; returns the text and the (shape index, start, end) span of every entity phrase."""
    text, spans = "", []

    def entity(article: str, shape_index: int) -> None:
        nonlocal text
        shape = scene.shapes[shape_index]
        if article == "a" and shape.colour[0] in "aeiou":
            article = "an"
        phrase = f"{article} {shape.colour} {shape.kind}"
        spans.append((shape_index, len(text), len(text) + len(phrase)))
        text += phrase

    pos = 0
    for match in re.finditer(r"\{(\w+)\}", template):
        text += template[pos:match.start()]
        pos = match.end()
        key = match.group(1)
        if key == "all":
            for i, shape_index in enumerate(order):
                if i:
                    text += " and " if i == len(order) - 1 else ", "
                entity("a", shape_index)
        elif key == "bg":
            text += scene.background
        elif key == "n":
            text += NUMBER_WORDS[len(order)]
        elif key == "shapes":
            text += "shape" if len(order) == 1 else "shapes"
        elif key[0] == "a":
            entity("a", order[int(key[1:])])
        elif key.startswith("the"):
            entity("the", order[int(key[3:])])
        elif key[0] == "p":
            shape = scene.shapes[order[int(key[1:])]]
            text += POSITIONS[(shape.row, shape.col)]
        elif key[0] == "r":
            text += _relation(scene.shapes[order[int(key[1])]], scene.shapes[order[int(key[2])]], rng)
        else:  # pragma: no cover - a typo in TEMPLATES
            raise KeyError(key)
    text += template[pos:]
    return text, spans


def _complete_template(n: int, rng: random.Random) -> str:
    clause = rng.choice(COMPLETE_CLAUSES)
    parts = [clause % (k, k) for k in range(n)]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice(COMPLETE_OPENINGS) + listed


def make_captions(scene: Scene, count: int, rng: random.Random, ending: str = ".",
                  style: str = "varied") -> list[Caption]:
    """`count` captions using different templates (cycled when more are asked than apply), deduplicated.

    style "varied": the TEMPLATES (a caption often names only some shapes); "complete": every caption names every
    shape with colour and position (COMPLETE_OPENINGS/COMPLETE_CLAUSES)."""
    n = len(scene.shapes)
    if style == "complete":
        captions, texts = [], set()
        for _ in range(count):
            for _attempt in range(10):
                order = rng.sample(range(n), n)
                text, spans = _render_template(_complete_template(n, rng), order, scene, rng)
                if text not in texts:
                    break
            texts.add(text)
            captions.append(Caption(text[0].upper() + text[1:] + ending, tuple(spans)))
        return captions
    if style != "varied":
        raise ValueError(f"unknown caption style {style!r}")
    usable = [t for lo, hi, t in TEMPLATES if lo <= n <= hi]
    templates = rng.sample(usable, len(usable))
    captions, texts = [], set()
    for i in range(count):
        for _attempt in range(10):
            order = rng.sample(range(n), n)
            text, spans = _render_template(templates[i % len(templates)], order, scene, rng)
            if text not in texts:
                break
        texts.add(text)
        captions.append(Caption(text[0].upper() + text[1:] + ending, tuple(spans)))
    return captions


def split_counts(splits: dict[str, float], num_images: int) -> dict[str, int]:
    """Fractions (sum 1) -> counts by largest remainder, each non-zero split getting >= 1 image when possible."""
    if not math.isclose(sum(splits.values()), 1.0, abs_tol=1e-6):
        return {name: int(v) for name, v in splits.items()}
    exact = {name: frac * num_images for name, frac in splits.items()}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(splits, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: num_images - sum(counts.values())]:
        counts[name] += 1
    for name, frac in splits.items():
        if frac > 0 and counts[name] == 0:
            donor = max(counts, key=counts.get)
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[name] += 1
    return counts


def assign_splits(splits: dict[str, float], num_images: int, rng: random.Random) -> list[str]:
    labels = [name for name, n in split_counts(splits, num_images).items() for _ in range(n)]
    rng.shuffle(labels)
    return labels


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-case words without punctuation."""
    return re.findall(r"[a-z0-9]+", raw.lower())


# ---------------------------------------------------------------------------------------------------------------
# Rendering.


def render(scene: Scene, seed: int, noise: float) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    if scene.background == "noisy" and noise > 0:
        rng = np.random.default_rng([seed, scene.index])
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def _write_images(jobs: list[tuple[Scene, Path]], params) -> None:
    def work(job):
        scene, path = job
        render(scene, params.seed, params.noise).save(path, "JPEG", quality=params.jpeg_quality)

    with ThreadPoolExecutor(params.threads) as pool:  # PIL encodes without the GIL
        for _ in pool.map(work, jobs):
            pass


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------------------------
# VQAv2 questions about the shapes: colour, shape, position, count and yes/no questions, each answered by 10
# simulated annotators (most answer correctly, a few pick another answer of the same kind), so the soft VQA scores
# (0.3 per agreeing annotator, capped at 1) are exercised.

WHERE_WORDS = {cell: words.split(" ", 2)[-1] for cell, words in POSITIONS.items()}  # "at the top left" -> "top left"
ANSWER_POOLS = {
    "colour": tuple(COLOURS), "kind": SHAPES, "count": ("1", "2", "3"), "yes/no": ("yes", "no"),
    "where": tuple(WHERE_WORDS.values()),
}


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    pool: str  # key of ANSWER_POOLS the wrong answers come from
    question_type: str  # VQA's question_type: the question's opening words
    answer_type: str  # "yes/no" | "number" | "other"


def _questions_for(scene: Scene, rng: random.Random) -> list[Question]:
    """Every question this generator can ask about the scene (the caller samples from them)."""
    shapes = scene.shapes
    kinds = [s.kind for s in shapes]
    out = [Question("How many shapes are there?", str(len(shapes)), "count", "how many", "number")]
    for s in shapes:
        where = POSITIONS[(s.row, s.col)]
        if kinds.count(s.kind) == 1:  # "the circle" must name one shape
            out.append(Question(f"What color is the {s.kind}?", s.colour, "colour", "what color is the", "other"))
        out.append(Question(f"What shape is {where}?", s.kind, "kind", "what shape is", "other"))
        out.append(Question(f"What color is the shape {where}?", s.colour, "colour", "what color is the", "other"))
        out.append(Question(f"Where is the {s.colour} {s.kind}?", WHERE_WORDS[(s.row, s.col)], "where",
                            "where is the", "other"))
    present = {(s.colour, s.kind) for s in shapes}
    shown = rng.choice(shapes)
    absent = rng.choice([(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present])
    for (colour, kind), answer in (((shown.colour, shown.kind), "yes"), (absent, "no")):
        article = "an" if colour[0] in "aeiou" else "a"
        out.append(Question(f"Is there {article} {colour} {kind}?", answer, "yes/no", "is there a", "yes/no"))
    return out


def make_questions(scene: Scene, count: int, rng: random.Random) -> list[Question]:
    """Up to `count` different questions about the scene; yes/no questions are as likely as any one other kind."""
    candidates = _questions_for(scene, rng)
    by_pool: dict[str, list[Question]] = {}
    for q in candidates:
        by_pool.setdefault(q.pool, []).append(q)
    pools = sorted(by_pool)
    chosen: list[Question] = []
    while len(chosen) < min(count, len(candidates)):
        options = [q for q in by_pool[rng.choice(pools)] if q not in chosen]
        if options:
            chosen.append(rng.choice(options))
    return chosen


def annotator_answers(question: Question, rng: random.Random, noise: float) -> list[str]:
    """Ten annotators' answers: the right one, or (with probability `noise`) another from the same pool; counts
    are sometimes written as words ("two"), as people do (VQA's answer normalisation maps them back)."""
    answers = []
    for _ in range(10):
        answer = question.answer
        if rng.random() < noise:
            answer = rng.choice([a for a in ANSWER_POOLS[question.pool] if a != question.answer])
        if question.pool == "count" and rng.random() < 0.2:
            answer = NUMBER_WORDS[int(answer)]
        answers.append(answer)
    return answers


def write_vqa(out_dir: Path, entries: list[tuple[Scene, str, int]], params) -> dict:
    """VQAv2 files for (scene, COCO folder, COCO id): v2_OpenEnded_mscoco_{folder}_questions.json and
    v2_mscoco_{folder}_annotations.json in out_dir, as the official zips extract them."""
    rng = random.Random(f"vqa-{params.seed}")  # its own stream: captions and images do not change with VQA on
    questions: dict[str, list] = {}
    annotations: dict[str, list] = {}
    for scene, folder, coco_id in entries:
        for k, question in enumerate(make_questions(scene, params.vqa_questions_per_image, rng)):
            question_id = coco_id * 1000 + k  # VQA's numbering: image id * 1000 + index
            answers = annotator_answers(question, rng, params.vqa_answer_noise)
            majority = max(answers, key=lambda a: (answers.count(a), a == question.answer))
            questions.setdefault(folder, []).append(
                {"image_id": coco_id, "question": question.text, "question_id": question_id})
            annotations.setdefault(folder, []).append({
                "question_type": question.question_type, "multiple_choice_answer": majority,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)],
                "image_id": coco_id, "answer_type": question.answer_type, "question_id": question_id,
            })
    for folder in questions:
        common = {"info": {"description": "vlflow synthetic shapes VQA"}, "license": {}, "data_type": "mscoco",
                  "data_subtype": folder}
        _write_json(out_dir / f"v2_OpenEnded_mscoco_{folder}_questions.json",
                    {**common, "task_type": "Open-Ended", "questions": questions[folder]})
        _write_json(out_dir / f"v2_mscoco_{folder}_annotations.json", {**common, "annotations": annotations[folder]})
    return {folder: len(items) for folder, items in questions.items()}


# ---------------------------------------------------------------------------------------------------------------
# COCO 2014 + Karpathy.


def generate_coco(out_dir: Path, params) -> dict:
    """Write train2014/, val2014/ and karpathy/dataset_coco.json under out_dir; returns counts."""
    out_dir = Path(out_dir)
    rng = random.Random(f"coco-{params.seed}")
    scenes = plan_scenes(params.num_images, params.image_size, params.seed,
                         params.noisy_fraction, params.vary_aspect)
    splits = assign_splits(params.splits, len(scenes), rng)
    coco_ids = rng.sample(range(1, 600_000), len(scenes))
    for folder in ("train2014", "val2014"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    images, jobs, vqa_entries, sentid = [], [], [], 0
    for scene, split, coco_id in zip(scenes, splits, coco_ids):
        folder = "train2014" if split == "train" else "val2014"  # Karpathy's val/test/restval come from val2014
        filename = f"COCO_{folder}_{coco_id:012d}.jpg"
        captions = make_captions(scene, params.captions_per_image, rng, ending=".", style=params.caption_style)
        sentences = []
        for caption in captions:
            sentences.append({"tokens": tokenize(caption.text), "raw": caption.text, "imgid": scene.index,
                              "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": scene.index, "split": split, "sentences": sentences, "cocoid": coco_id})
        jobs.append((scene, out_dir / folder / filename))
        vqa_entries.append((scene, folder, coco_id))
    _write_images(jobs, params)
    _write_json(out_dir / "karpathy" / "dataset_coco.json", {"images": images, "dataset": "coco"})
    metrics = {"images": len(images), "captions": sentid, "splits": _count(splits)}
    if params.vqa_questions_per_image:
        metrics["vqa_questions"] = write_vqa(out_dir, vqa_entries, params)
    return metrics


def coco_stage(ctx) -> dict:
    return generate_coco(ctx.output_dir, ctx.params)


# ---------------------------------------------------------------------------------------------------------------
# Flickr30k + Entities + MDETR annotations.


def _entities_sentence(caption: Caption) -> str:
    """Flickr30k Entities markup: '[/EN#1/other A red circle] left of [/EN#2/other a blue square] .'"""
    out, pos = "", 0
    for shape_index, start, end in sorted(caption.spans, key=lambda s: s[1]):
        out += caption.text[pos:start] + f"[/EN#{shape_index + 1}/other {caption.text[start:end]}]"
        pos = end
    return out + caption.text[pos:]


def _entities_xml(scene: Scene, filename: str) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", scene.width), ("height", scene.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for shape_index, shape in enumerate(scene.shapes):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = str(shape_index + 1)
        box = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = shape.box
        # Entities boxes are 1-based inclusive pixel coordinates.
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def generate_flickr30k(out_dir: Path, params) -> dict:
    """Write flickr30k-images/, karpathy/dataset_flickr30k.json, flickr30k_entities/ and mdetr_annotations/."""
    out_dir = Path(out_dir)
    rng = random.Random(f"flickr30k-{params.seed}")
    scenes = plan_scenes(params.num_images, params.image_size, params.seed,
                         params.noisy_fraction, params.vary_aspect)
    splits = assign_splits(params.splits, len(scenes), rng)
    flickr_ids = rng.sample(range(1_000_000_000, 9_999_999_999), len(scenes))
    image_dir = out_dir / "flickr30k-images"
    sentences_dir = out_dir / "flickr30k_entities" / "Sentences"
    annotations_dir = out_dir / "flickr30k_entities" / "Annotations"
    for folder in (image_dir, sentences_dir, annotations_dir):
        folder.mkdir(parents=True, exist_ok=True)

    images, jobs, sentid = [], [], 0
    mdetr = {name: {"images": [], "annotations": []} for name in ("train", "val", "test")}
    for scene, split, flickr_id in zip(scenes, splits, flickr_ids):
        filename = f"{flickr_id}.jpg"
        captions = make_captions(scene, params.captions_per_image, rng, ending=" .", style=params.caption_style)
        sentences = []
        for caption in captions:
            sentences.append({"tokens": tokenize(caption.text), "raw": caption.text, "imgid": scene.index,
                              "sentid": sentid})
            sentid += 1
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": scene.index, "sentences": sentences,
                       "split": split, "filename": filename})
        (sentences_dir / f"{flickr_id}.txt").write_text("".join(_entities_sentence(c) + "\n" for c in captions))
        (annotations_dir / f"{flickr_id}.xml").write_bytes(_entities_xml(scene, filename))
        _add_mdetr_entries(mdetr[split], scene, flickr_id, filename, captions)
        jobs.append((scene, image_dir / filename))
    _write_images(jobs, params)
    _write_json(out_dir / "karpathy" / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    categories = [{"supercategory": "object", "id": 1, "name": "object"}]
    for split, content in mdetr.items():
        # Each phrase has exactly one box here, so the merged and separate variants coincide.
        for variant in ("separateGT", "mergedGT"):
            _write_json(out_dir / "mdetr_annotations" / f"final_flickr_{variant}_{split}.json",
                        {**content, "categories": categories})
    return {"images": len(images), "captions": sentid, "splits": _count(splits)}


def _add_mdetr_entries(target: dict, scene: Scene, flickr_id: int, filename: str, captions: list[Caption]) -> None:
    """One MDETR image entry per caption, one annotation per grounded phrase (ids are unique within the split)."""
    for sentence_id, caption in enumerate(captions):
        image_id = len(target["images"])
        spans = sorted(caption.spans, key=lambda s: s[1])
        target["images"].append({
            "file_name": filename, "height": scene.height, "width": scene.width, "id": image_id,
            "caption": caption.text, "dataset_name": "flickr", "tokens_negative": [[0, len(caption.text)]],
            "sentence_id": sentence_id, "original_img_id": flickr_id,
            "tokens_positive_eval": [[[start, end]] for _, start, end in spans],
        })
        for shape_index, start, end in spans:
            x1, y1, x2, y2 = scene.shapes[shape_index].box
            target["annotations"].append({
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "image_id": image_id, "category_id": 1,
                "id": len(target["annotations"]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                "tokens_positive": [[start, end]], "phrase_ids": shape_index + 1,
            })


def flickr30k_stage(ctx) -> dict:
    return generate_flickr30k(ctx.output_dir, ctx.params)


def _count(labels: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# MDETR "mixed" grounding data (final_mixed_train.json over COCO train2014 + GQA/VG images), as UniTAB pretrains on.


def generate_mdetr_mixed(out_dir: Path, params) -> dict:
    """Write train2014/, gqa/images/ and mdetr_annotations/final_mixed_train.json: one image entry per caption with
    MDETR's fields (data_source picks the image folder, dataset_name "mixed", tokens_negative, sentence_id,
    original_img_id, tokens_positive_eval), one annotation per grounded phrase."""
    out_dir = Path(out_dir)
    rng = random.Random(f"mdetr-mixed-{params.seed}")
    scenes = plan_scenes(params.num_images, params.image_size, params.seed, params.noisy_fraction, params.vary_aspect)
    folders = {"coco": out_dir / "train2014", "vg": out_dir / "gqa" / "images"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    content: dict = {"images": [], "annotations": []}
    jobs, sources = [], []
    for scene in scenes:
        source = "vg" if rng.random() < params.vg_fraction else "coco"
        original_id = 1_000_000 + scene.index
        filename = f"COCO_train2014_{original_id:012d}.jpg" if source == "coco" else f"{original_id}.jpg"
        captions = make_captions(scene, params.captions_per_image, rng, ending="", style=params.caption_style)
        for sentence_id, caption in enumerate(captions):
            image_id = len(content["images"])
            spans = sorted(caption.spans, key=lambda s: s[1])
            content["images"].append({
                "file_name": filename, "height": scene.height, "width": scene.width, "id": image_id,
                "original_id": original_id, "caption": caption.text, "dataset_name": "mixed",
                "data_source": source, "tokens_negative": [[0, len(caption.text)]], "sentence_id": sentence_id,
                "original_img_id": original_id, "tokens_positive_eval": [[[start, end]] for _, start, end in spans],
            })
            for shape_index, start, end in spans:
                x1, y1, x2, y2 = scene.shapes[shape_index].box
                content["annotations"].append({
                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "image_id": image_id, "category_id": 1,
                    "id": len(content["annotations"]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "tokens_positive": [[start, end]],
                })
        jobs.append((scene, folders[source] / filename))
        sources.append(source)
    _write_images(jobs, params)
    _write_json(out_dir / "mdetr_annotations" / "final_mixed_train.json",
                {**content, "categories": [{"supercategory": "object", "id": 1, "name": "object"}]})
    return {"images": len(scenes), "captions": len(content["images"]), "sources": _count(sources)}


def mdetr_mixed_stage(ctx) -> dict:
    return generate_mdetr_mixed(ctx.output_dir, ctx.params)


# ---------------------------------------------------------------------------------------------------------------
# ViLT's other pretraining corpora: Visual Genome region descriptions, SBU Captions and Google Conceptual Captions,
# in the layouts of ViLT's DATA.md.


def _region_box(scene: Scene, caption: Caption) -> tuple[int, int, int, int]:
    """x, y, width, height of the box around every shape the phrase names (the whole image if it names none)."""
    boxes = [scene.shapes[shape_index].box for shape_index, _, _ in caption.spans]
    if not boxes:
        return 0, 0, scene.width, scene.height
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return x1, y1, x2 - x1, y2 - y1


def generate_vg(out_dir: Path, params) -> dict:
    """Write images/VG_100K/<id>.jpg, images/VG_100K_2/<id>.jpg and annotations/region_descriptions.json (a list of
    {"regions": [{region_id, width, height, image_id, phrase, y, x}], "id"}, one entry per image), as Visual Genome
    1.2 ships them. Phrases are lower-case without a final period, like VG's; some images repeat a phrase."""
    out_dir = Path(out_dir)
    rng = random.Random(f"vg-{params.seed}")
    scenes = plan_scenes(params.num_images, params.image_size, params.seed, params.noisy_fraction, params.vary_aspect)
    image_ids = sorted(rng.sample(range(1, 2_500_000), len(scenes)))
    folders = {name: out_dir / "images" / name for name in ("VG_100K", "VG_100K_2")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    entries, jobs, region_id, duplicates = [], [], 0, 0
    for scene, image_id in zip(scenes, image_ids):
        captions = make_captions(scene, params.captions_per_image, rng, ending="", style=params.caption_style)
        if rng.random() < params.duplicate_fraction:
            captions.append(rng.choice(captions))
            duplicates += 1
        regions = []
        for caption in captions:
            x, y, width, height = _region_box(scene, caption)
            region_id += 1
            regions.append({"region_id": region_id, "width": width, "height": height, "image_id": image_id,
                            "phrase": caption.text.lower(), "y": y, "x": x})
        entries.append({"regions": regions, "id": image_id})
        folder = folders["VG_100K_2" if rng.random() < 0.4 else "VG_100K"]  # real VG: 64,346 / 43,733 images
        jobs.append((scene, folder / f"{image_id}.jpg"))
    _write_images(jobs, params)
    _write_json(out_dir / "annotations" / "region_descriptions.json", entries)
    return {"images": len(scenes), "regions": region_id, "images_with_a_repeated_phrase": duplicates}


def vg_stage(ctx) -> dict:
    return generate_vg(ctx.output_dir, ctx.params)


def _generate_web_captions(out_dir: Path, params, corpus: str, annotation_of: dict[str, str]) -> dict:
    """Images named by a 7-digit index in images_<split>/<first four digits>/ (no extension, as ViLT's DATA.md
    shows), and per split a JSON list of [image path, caption] pairs; `missing_fraction` of the annotated images are
    not written (their URLs died). One caption per image, GCC's lower-case without a period, SBU's as typed."""
    out_dir = Path(out_dir)
    rng = random.Random(f"{corpus}-{params.seed}")
    scenes = plan_scenes(params.num_images, params.image_size, params.seed, params.noisy_fraction, params.vary_aspect)
    splits = assign_splits(params.splits, len(scenes), rng)
    pairs: dict[str, list] = {split: [] for split in annotation_of}
    jobs, missing = [], {split: 0 for split in annotation_of}
    for scene, split in zip(scenes, splits):
        name = f"{len(pairs[split]):07d}"
        relative = f"images_{split}/{name[:4]}/{name}"
        caption = make_captions(scene, 1, rng, ending="" if corpus == "gcc" else ".", style=params.caption_style)[0]
        pairs[split].append([relative, caption.text.lower() if corpus == "gcc" else caption.text])
        if rng.random() < params.missing_fraction:
            missing[split] += 1
            continue
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((scene, out_dir / relative))
    for split in annotation_of:  # a folder exists for each split, even when every one of its URLs died
        (out_dir / f"images_{split}").mkdir(parents=True, exist_ok=True)
    _write_images(jobs, params)  # JPEG bytes in extension-less files
    for split, annotation in annotation_of.items():
        _write_json(out_dir / annotation, pairs[split])
    return {"annotated": {split: len(p) for split, p in pairs.items()}, "missing_images": missing,
            "images": len(jobs)}


def sbu_stage(ctx) -> dict:
    return generate_sbu(ctx.output_dir, ctx.params)


def generate_sbu(out_dir: Path, params) -> dict:
    """ViLT's SBU layout: images_train/<subfolder>/<name> and annot.json."""
    return _generate_web_captions(out_dir, params, "sbu", {"train": "annot.json"})


def generate_gcc(out_dir: Path, params) -> dict:
    """ViLT's GCC layout: images_<split>/<subfolder>/<name> and <split>_annot.json for train and val."""
    return _generate_web_captions(out_dir, params, "gcc", {split: f"{split}_annot.json" for split in params.splits})


def gcc_stage(ctx) -> dict:
    return generate_gcc(ctx.output_dir, ctx.params)
