"""MDETR's "mixed" grounding data (UniTAB pretrains on flickr + mixed): the synthetic generator writes the real layout
(final_mixed_train.json over COCO train2014 + GQA/VG images, `data_source` per image entry), arrow.grounding_mixed
reads it into the grounding columns, and the pretraining stage appends it to the Flickr30k train split."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from vlflow.stages.data.arrow_grounding import convert_grounding_mixed
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.reader import GroundingArrowDataset
from vlflow.stages.data.spec import GroundingMixedArrowParams, SyntheticMdetrMixedParams
from vlflow.stages.data.synthetic import generate_mdetr_mixed


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    generate_mdetr_mixed(root, SyntheticMdetrMixedParams(num_images=8, image_size=64, captions_per_image=2, seed=3))
    return root


def test_mixed_layout_converts_to_grounding_rows_with_each_image_from_its_source(mixed_root, tmp_path):
    data = json.loads((mixed_root / "mdetr_annotations" / "final_mixed_train.json").read_text())
    entries = data["images"]
    assert {e["data_source"] for e in entries} == {"coco", "vg"}
    assert {"caption", "tokens_negative", "dataset_name", "original_img_id", "tokens_positive_eval"} <= set(entries[0])
    report = convert_grounding_mixed(mixed_root, tmp_path / "out", GroundingMixedArrowParams())
    assert report.metrics() == {"rows": {"train": len(entries)}, "bad_images": 0}
    rows = GroundingArrowDataset([tmp_path / "out" / "mixed_grounding_train.arrow"])
    by_image: dict = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for index, entry in enumerate(entries):
        folder = {"coco": "train2014", "vg": "gqa/images"}[entry["data_source"]]
        assert rows.image_id(index) == entry["file_name"] and rows.caption(index) == entry["caption"]
        assert rows._value("image", index) == (mixed_root / folder / entry["file_name"]).read_bytes()
        phrases = rows.phrases(index)
        expected = sorted(by_image.get(entry["id"], []), key=lambda a: a["tokens_positive"][0][0])
        assert [(p["start"], p["end"]) for p in phrases] == [tuple(a["tokens_positive"][0]) for a in expected]
        for phrase, ann in zip(phrases, expected):
            x, y, w, h = ann["bbox"]
            assert phrase["text"] == entry["caption"][phrase["start"]:phrase["end"]]
            assert phrase["boxes"] == [pytest.approx([x / entry["width"], y / entry["height"],
                                                      (x + w) / entry["width"], (y + h) / entry["height"]])]


def test_unknown_image_source_is_one_error_naming_the_entry(mixed_root, tmp_path):
    data = json.loads((mixed_root / "mdetr_annotations" / "final_mixed_train.json").read_text())
    data["images"][1]["data_source"] = "laion"
    (tmp_path / "mdetr_annotations").mkdir()
    path = tmp_path / "mdetr_annotations" / "final_mixed_train.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="data_source 'laion' has no image folder") as error:
        convert_grounding_mixed(tmp_path, tmp_path / "out", GroundingMixedArrowParams())
    assert str(path) in str(error.value) and "images[1].data_source" in str(error.value)
    with pytest.raises(ValidationError, match="relative path inside the root"):
        GroundingMixedArrowParams(image_dirs={"coco": "../elsewhere"})
