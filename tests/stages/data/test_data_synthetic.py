"""Synthetic COCO / Flickr30k trees: layouts, formats and determinism."""
import hashlib
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlflow.stages.data.spec import STAGES, SyntheticCocoParams, SyntheticFlickrParams
from vlflow.stages.data.synthetic import generate_coco, generate_flickr30k, split_counts


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    metrics = generate_coco(root, SyntheticCocoParams(num_images=24, image_size=64, seed=3))
    return root, metrics


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("f30k")
    generate_flickr30k(root, SyntheticFlickrParams(num_images=16, image_size=64, seed=5))
    return root


def test_stage_specs_registered_without_torch():
    names = {s.name for s in STAGES}
    assert {"synthetic.coco", "synthetic.flickr30k", "download", "arrow.coco_karpathy", "arrow.f30k_karpathy",
            "arrow.grounding"} <= names
    for spec in STAGES:
        assert callable(spec.load())
    code = "import sys, vlflow.stages.data.spec; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_coco_layout_and_karpathy_json(coco):
    root, metrics = coco
    data = json.loads((root / "karpathy" / "dataset_coco.json").read_text())
    assert data["dataset"] == "coco" and len(data["images"]) == 24 == metrics["images"]
    splits = {im["split"] for im in data["images"]}
    assert splits == {"train", "val", "test", "restval"}
    sentids = []
    for im in data["images"]:
        assert set(im) == {"filepath", "filename", "imgid", "split", "sentences", "sentids", "cocoid"}
        folder = "train2014" if im["split"] == "train" else "val2014"
        assert im["filepath"] == folder
        assert re.fullmatch(rf"COCO_{folder}_\d{{12}}\.jpg", im["filename"])
        assert int(im["filename"][-16:-4]) == im["cocoid"]
        with Image.open(root / folder / im["filename"]) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"} and s["imgid"] == im["imgid"]
            assert s["tokens"] == re.findall(r"[a-z]+", s["raw"].lower())
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids += im["sentids"]
    assert sorted(sentids) == list(range(24 * 5))
    # every image's caption set is distinguishable from every other image's
    caption_sets = [frozenset(s["raw"] for s in im["sentences"]) for im in data["images"]]
    assert len(set(caption_sets)) == len(caption_sets)


def test_captions_describe_the_drawn_shapes(coco):
    """'There is a <colour> <shape> <position>' captions: that colour is drawn in that grid cell."""
    from vlflow.stages.data.synthetic import COLOURS, POSITIONS

    root, _ = coco
    data = json.loads((root / "karpathy" / "dataset_coco.json").read_text())
    cell_of = {words: cell for cell, words in POSITIONS.items()}
    checked = 0
    for im in data["images"]:
        for s in im["sentences"]:
            m = re.match(r"There is an? (\w+) (circle|square|triangle) (.+)\.$", s["raw"])
            if not m:
                continue
            row, col = cell_of[m.group(3)]
            with Image.open(root / im["filepath"] / im["filename"]) as image:
                third = image.width / 3
                cell = image.convert("RGB").crop((int(col * third), int(row * third),
                                                  int((col + 1) * third), int((row + 1) * third)))
            want = COLOURS[m.group(1)]
            distance = np.abs(np.asarray(cell, dtype=int) - np.array(want)).sum(axis=-1)
            assert (distance < 60).sum() > 20, (im["filename"], s["raw"])
            checked += 1
    assert checked >= 5


def test_same_seed_same_bytes_other_seed_differs(coco, tmp_path):
    root, _ = coco
    generate_coco(tmp_path / "a", SyntheticCocoParams(num_images=24, image_size=64, seed=3, threads=1))
    assert _tree_digest(tmp_path / "a") == _tree_digest(root)
    generate_coco(tmp_path / "b", SyntheticCocoParams(num_images=24, image_size=64, seed=4))
    assert _tree_digest(tmp_path / "b") != _tree_digest(root)


def test_split_counts_fractions_and_counts():
    assert split_counts({"train": 0.8, "val": 0.1, "test": 0.1}, 16) == {"train": 13, "val": 2, "test": 1}
    assert split_counts({"train": 0.98, "val": 0.01, "test": 0.01}, 10) == {"train": 8, "val": 1, "test": 1}
    assert split_counts({"train": 7, "val": 2, "test": 1}, 10) == {"train": 7, "val": 2, "test": 1}
    with pytest.raises(ValueError, match="sum to num_images"):
        SyntheticFlickrParams(num_images=10, splits={"train": 7, "val": 2})
    with pytest.raises(ValueError, match="unknown Flickr30k split"):
        SyntheticFlickrParams(splits={"train": 0.5, "restval": 0.5})


def test_flickr_layout_entities_and_mdetr(flickr):
    root = flickr
    data = json.loads((root / "karpathy" / "dataset_flickr30k.json").read_text())
    assert data["dataset"] == "flickr30k" and len(data["images"]) == 16
    assert {im["split"] for im in data["images"]} == {"train", "val", "test"}
    by_name = {}
    for im in data["images"]:
        assert set(im) == {"filename", "imgid", "split", "sentences", "sentids"}
        assert re.fullmatch(r"\d+\.jpg", im["filename"])
        assert (root / "flickr30k-images" / im["filename"]).is_file()
        by_name[im["filename"]] = im
        stem = im["filename"][:-4]
        lines = (root / "flickr30k_entities" / "Sentences" / f"{stem}.txt").read_text().splitlines()
        # stripping the Entities markup gives back the raw captions
        assert [re.sub(r"\[/EN#\d+/\w+ ([^\]]+)\]", r"\1", line) for line in lines] == \
            [s["raw"] for s in im["sentences"]]
        xml = ET.parse(root / "flickr30k_entities" / "Annotations" / f"{stem}.xml").getroot()
        width, height = int(xml.findtext("size/width")), int(xml.findtext("size/height"))
        with Image.open(root / "flickr30k-images" / im["filename"]) as image:
            assert image.size == (width, height)
        for obj in xml.findall("object"):
            box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] < box[2] <= width and 1 <= box[1] < box[3] <= height
        entity_ids = {m for line in lines for m in re.findall(r"/EN#(\d+)/", line)}
        assert entity_ids <= {obj.findtext("name") for obj in xml.findall("object")}

    total_entries = 0
    for split in ("train", "val", "test"):
        mdetr = json.loads((root / "mdetr_annotations" / f"final_flickr_separateGT_{split}.json").read_text())
        total_entries += len(mdetr["images"])
        ids = {e["id"] for e in mdetr["images"]}
        for entry in mdetr["images"]:
            assert {"id", "file_name", "height", "width", "caption", "tokens_positive_eval", "sentence_id",
                    "original_img_id"} <= set(entry)
            im = by_name[entry["file_name"]]
            assert im["split"] == split and entry["original_img_id"] == int(entry["file_name"][:-4])
            assert entry["caption"] == im["sentences"][entry["sentence_id"]]["raw"]
        for ann in mdetr["annotations"]:
            assert ann["image_id"] in ids
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            (start, end), = ann["tokens_positive"]
            caption = next(e["caption"] for e in mdetr["images"] if e["id"] == ann["image_id"])
            assert re.fullmatch(r"(a|an|the) (red|green|blue|yellow|purple|orange) (circle|square|triangle)",
                                caption[start:end].lower())
    assert total_entries == 16 * 5  # one MDETR image entry per caption


def test_complete_captions_name_every_shape_with_its_position(tmp_path):
    """caption_style "complete": each caption names every drawn shape with its colour and grid position, so a
    caption matches its own image (the default "varied" style often names only some shapes)."""
    from vlflow.stages.data.synthetic import POSITIONS, plan_scenes

    params = SyntheticCocoParams(num_images=30, image_size=96, seed=2, caption_style="complete")
    generate_coco(tmp_path, params)
    data = json.loads((tmp_path / "karpathy" / "dataset_coco.json").read_text())
    scenes = plan_scenes(30, 96, 2)
    assert SyntheticCocoParams().caption_style == "varied"
    for im in data["images"]:
        shapes = scenes[im["imgid"]].shapes
        assert len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            text = s["raw"].lower()
            named = re.findall(r"\ban? (red|green|blue|yellow|purple|orange) (circle|square|triangle)\b", text)
            assert sorted(named) == sorted((sh.colour, sh.kind) for sh in shapes), s["raw"]
            for shape in shapes:
                entity = f"{shape.colour} {shape.kind}"
                where = POSITIONS[(shape.row, shape.col)]
                assert f"{entity} {where}" in text or re.search(rf"{where} an? {entity}", text), (s["raw"], where)
    # the same seed gives the same scenes (and images) whatever the caption style
    varied = tmp_path / "varied"
    generate_coco(varied, SyntheticCocoParams(num_images=30, image_size=96, seed=2))
    for im in data["images"]:
        assert (varied / im["filepath"] / im["filename"]).read_bytes() == \
            (tmp_path / im["filepath"] / im["filename"]).read_bytes()
    with pytest.raises(ValueError):
        SyntheticCocoParams(caption_style="short")
