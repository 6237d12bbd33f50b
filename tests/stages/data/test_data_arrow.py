"""Arrow conversions: ViLT schema/rows/order, bad images, annotation errors, grounding boxes and spans."""
import io
import json
import shutil
from collections import defaultdict

import pyarrow as pa
import pytest
from PIL import Image
from vlflow.stages.data.arrow_coco import convert_coco_karpathy
from vlflow.stages.data.arrow_f30k import convert_f30k_karpathy
from vlflow.stages.data.arrow_grounding import convert_grounding
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.spec import ArrowParams, GroundingArrowParams, SyntheticCocoParams, SyntheticFlickrParams
from vlflow.stages.data.synthetic import generate_coco, generate_flickr30k

from vlflow.errors import VlflowError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    generate_coco(root, SyntheticCocoParams(num_images=30, image_size=48, seed=1))
    return root


@pytest.fixture(scope="module")
def flickr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("f30k")
    generate_flickr30k(root, SyntheticFlickrParams(num_images=12, image_size=48, seed=2))
    return root


def read_ipc_file(path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()  # fails on the IPC *stream* format


def vilt_reference(root, json_rel, image_dir_of, splits):
    """All-in-memory conversion done the way ViLT's write_*_karpathy.py does it (rows in json order by split)."""
    images = json.loads((root / json_rel).read_text())["images"]
    iid2captions, iid2split, paths = defaultdict(list), {}, []
    for cap in images:
        iid2split[cap["filename"]] = cap["split"]
        for c in cap["sentences"]:
            iid2captions[cap["filename"]].append(c["raw"])
        paths.append(image_dir_of(cap) / cap["filename"])
    bs = [[p.read_bytes(), iid2captions[p.name], p.name, iid2split[p.name]] for p in paths if p.name in iid2captions]
    tables = {}
    for split in splits:
        batches = [b for b in bs if b[-1] == split]
        tables[split] = pa.Table.from_pylist(
            [dict(zip(["image", "caption", "image_id", "split"], b)) for b in batches])
    return tables


@pytest.mark.parametrize("dataset", ["coco", "f30k"])
def test_caption_arrows_equal_vilt_reference(dataset, coco_root, flickr_root, tmp_path):
    params = ArrowParams(batch_rows=4, read_threads=2)
    if dataset == "coco":
        root, splits, prefix = coco_root, ("train", "val", "restval", "test"), "coco_caption_karpathy"
        report = convert_coco_karpathy(root, tmp_path, params)
        reference = vilt_reference(root, "karpathy/dataset_coco.json", lambda c: root / c["filepath"], splits)
    else:
        root, splits, prefix = flickr_root, ("train", "val", "test"), "f30k_caption_karpathy"
        report = convert_f30k_karpathy(root, tmp_path, params)
        reference = vilt_reference(root, "karpathy/dataset_flickr30k.json",
                                   lambda c: root / "flickr30k-images", splits)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{prefix}_{s}.arrow" for s in splits]
                                                                 + ["report.json"])
    for split in splits:
        ours = read_ipc_file(tmp_path / f"{prefix}_{split}.arrow")
        assert ours.num_rows > 0
        assert ours.schema.equals(reference[split].schema), (ours.schema, reference[split].schema)
        assert ours.equals(reference[split])
        with pa.memory_map(str(tmp_path / f"{prefix}_{split}.arrow")) as source:
            assert pa.ipc.open_file(source).num_record_batches == -(-ours.num_rows // 4)  # streamed batches
        assert report.splits[split]["rows"] == ours.num_rows
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["bad_image_count"] == 0 and sum(s["rows"] for s in saved["splits"].values()) == \
        len(json.loads((root / "karpathy" / f"dataset_{'coco' if dataset == 'coco' else 'flickr30k'}.json")
                       .read_text())["images"])


@pytest.fixture
def damaged_coco(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    images = json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
    train = [im for im in images if im["split"] == "train"]
    missing, corrupt = train[1], train[3]
    (root / missing["filepath"] / missing["filename"]).unlink()
    (root / corrupt["filepath"] / corrupt["filename"]).write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    return root, missing["filename"], corrupt["filename"], len(train)


def test_bad_images_are_reported_and_skipped(damaged_coco, tmp_path):
    root, missing, corrupt, n_train = damaged_coco
    # batches of 3: the corrupt image (train[3]) opens a batch, whose next rows then move up in the batch's buffer
    report = convert_coco_karpathy(root, tmp_path / "out", ArrowParams(batch_rows=3))
    table = read_ipc_file(tmp_path / "out" / "coco_caption_karpathy_train.arrow")
    assert table.num_rows == n_train - 2
    assert missing not in table["image_id"].to_pylist() and corrupt not in table["image_id"].to_pylist()
    assert all(row["image"] == (root / "train2014" / row["image_id"]).read_bytes() for row in table.to_pylist())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["bad_image_count"] == 2 and saved["splits"]["train"]["skipped"] == 2
    reasons = {b["path"].split("/")[-1]: b["reason"] for b in saved["bad_images"]}
    assert reasons[missing] == "missing file"
    assert reasons[corrupt].startswith("corrupt image")
    assert report.metrics()["bad_images"] == 2


def test_bad_image_fails_when_asked(damaged_coco, tmp_path):
    root, missing, corrupt, _ = damaged_coco
    with pytest.raises(DataError) as info:
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams(on_bad_image="fail"))
    assert isinstance(info.value, VlflowError)
    message = str(info.value)
    assert (missing in message and "missing file" in message) or (corrupt in message and "corrupt" in message)
    assert "on_bad_image" in message
    assert not list((tmp_path / "out").glob("*.tmp"))  # no half-written arrow left behind


def test_missing_json_key_names_key_and_file(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    json_path = root / "karpathy" / "dataset_coco.json"
    data = json.loads(json_path.read_text())
    del data["images"][2]["sentences"]
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    message = str(info.value)
    assert "dataset_coco.json" in message and "images[2].sentences" in message and "missing key" in message

    json_path.write_text('{"images": [\n  {"filename": }]}')
    with pytest.raises(DataError, match=r"dataset_coco.json:2: invalid JSON"):
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    shutil.rmtree(root / "karpathy")
    with pytest.raises(DataError, match="dataset_coco.json: annotation file not found"):
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams())


def test_grounding_rows_boxes_and_spans(flickr_root, tmp_path):
    convert_grounding(flickr_root, tmp_path, GroundingArrowParams(batch_rows=7))
    for split in ("train", "val", "test"):
        mdetr = json.loads((flickr_root / "mdetr_annotations" / f"final_flickr_separateGT_{split}.json").read_text())
        table = read_ipc_file(tmp_path / f"f30k_grounding_{split}.arrow")
        assert table.schema.field("phrases").type.value_type.field("start").type == pa.int32()
        assert table.schema.field("phrases").type.value_type.field("boxes").type == pa.list_(pa.list_(pa.float32()))
        rows = table.drop(["image"]).to_pylist()
        assert len(rows) == len(mdetr["images"])  # one row per caption
        anns = defaultdict(list)
        for ann in mdetr["annotations"]:
            anns[ann["image_id"]].append(ann)
        for row, entry in zip(rows, mdetr["images"]):
            assert (row["caption"], row["image_id"], row["width"], row["height"], row["split"]) == \
                (entry["caption"], entry["file_name"], entry["width"], entry["height"], split)
            assert len(row["phrases"]) == len(anns[entry["id"]]) > 0
            assert [p["start"] for p in row["phrases"]] == sorted(p["start"] for p in row["phrases"])
            for phrase in row["phrases"]:
                assert phrase["text"] == row["caption"][phrase["start"]:phrase["end"]]
                assert phrase["text"].split()[-1] in {"circle", "square", "triangle"}
                ann = next(a for a in anns[entry["id"]] if a["tokens_positive"] == [[phrase["start"], phrase["end"]]])
                (x1, y1, x2, y2), = phrase["boxes"]
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
                x, y, w, h = ann["bbox"]
                assert [x1, y1, x2, y2] == pytest.approx(
                    [x / row["width"], y / row["height"], (x + w) / row["width"], (y + h) / row["height"]], abs=1e-6)


def test_stage_entry_points_follow_the_contract(coco_root, flickr_root, tmp_path):
    from vlflow.stage import StageContext, get_spec

    spec = get_spec("arrow.coco_karpathy")
    params = spec.params.model_validate({"batch_rows": 8})
    ctx = StageContext(stage="arrows", params=params, inputs={"root": coco_root}, output_dir=tmp_path / "c")
    metrics = spec.load()(ctx)
    assert json.loads(json.dumps(metrics)) == metrics  # stored in the manifest
    assert sum(metrics["rows"].values()) == 30 and metrics["bad_images"] == 0

    spec = get_spec("arrow.grounding")
    ctx = StageContext(stage="g", params=spec.params(), inputs={"root": flickr_root}, output_dir=tmp_path / "g")
    assert sum(spec.load()(ctx)["rows"].values()) == 12 * 5
    with pytest.raises(ValueError, match="on_bad_image"):
        get_spec("arrow.f30k_karpathy").params.model_validate({"on_bad_image": "ignore"})


def test_grounding_bad_images_and_size_mismatch(flickr_root, tmp_path):
    root = tmp_path / "f30k"
    shutil.copytree(flickr_root, root)
    json_path = root / "mdetr_annotations" / "final_flickr_separateGT_train.json"
    data = json.loads(json_path.read_text())
    first, last = data["images"][0], data["images"][-1]
    assert first["file_name"] != last["file_name"]
    (root / "flickr30k-images" / last["file_name"]).unlink()
    for entry in data["images"]:
        if entry["file_name"] == first["file_name"]:
            entry["width"] += 1
    json_path.write_text(json.dumps(data))
    report = convert_grounding(root, tmp_path / "out", GroundingArrowParams(splits=["train"]))
    reasons = {b["reason"] for b in report.bad_images}
    assert "missing file" in reasons
    assert any(r.startswith(f"image is {first['width'] - 1}x") and "annotations say" in r for r in reasons)
    n_bad = sum(e["file_name"] in (first["file_name"], last["file_name"]) for e in data["images"])
    assert report.splits["train"]["rows"] == len(data["images"]) - n_bad
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f30k_grounding_train.arrow", "report.json"]

    del data["annotations"][0]["bbox"]
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"final_flickr_separateGT_train.json: annotations\[0\].bbox: missing key"):
        convert_grounding(root, tmp_path / "out2", GroundingArrowParams(splits=["train"]))


def _rewrite_karpathy(root, change):
    json_path = root / "karpathy" / "dataset_coco.json"
    data = json.loads(json_path.read_text())
    change(data["images"])
    json_path.write_text(json.dumps(data))
    return json_path


def test_truncated_jpeg_is_a_bad_image(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    entry = next(im for im in json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
                 if im["split"] == "train")
    path = root / entry["filepath"] / entry["filename"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # headers intact: PIL's verify() passes it
    report = convert_coco_karpathy(root, tmp_path / "out", ArrowParams())  # the default: structure
    assert [(b["path"], b["reason"]) for b in report.bad_images] == \
        [(f"{entry['filepath']}/{entry['filename']}", "corrupt image: the JPEG has no end-of-image marker (truncated)")]
    report = convert_coco_karpathy(root, tmp_path / "decoded", ArrowParams(image_check="decode"))
    assert [(b["path"], b["reason"].split(" (")[0]) for b in report.bad_images] == \
        [(f"{entry['filepath']}/{entry['filename']}", "corrupt image: image file is truncated")]


def test_structure_check_keeps_jpegs_with_bytes_after_their_end_and_pngs(coco_root, tmp_path):
    """Bytes after the end-of-image marker (padding, appended metadata) are no truncation; a PNG is checked by its
    chunk CRCs (verify()), so a cut PNG is a bad image."""
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    images = json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
    padded = root / images[0]["filepath"] / images[0]["filename"]
    padded.write_bytes(padded.read_bytes() + b"\x00" * 100)
    png = root / images[1]["filepath"] / images[1]["filename"]
    buffer = io.BytesIO()
    Image.open(png).save(buffer, format="PNG")
    png.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    report = convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    assert [b["path"] for b in report.bad_images] == [f"{images[1]['filepath']}/{images[1]['filename']}"]


def test_a_split_whose_every_image_is_bad_is_an_error(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    test_images = [im for im in json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
                   if im["split"] == "test"]
    for entry in test_images:
        (root / entry["filepath"] / entry["filename"]).write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    first = test_images[0]
    assert str(info.value) == (
        f"{root / 'karpathy' / 'dataset_coco.json'}: every image of split 'test' is bad ({len(test_images)} of "
        f"{len(test_images)}; first: {first['filepath']}/{first['filename']}: corrupt image: not in an image format "
        "PIL can read); nothing to convert")


@pytest.mark.parametrize("change,field,message", [
    (lambda images: images[2].update(filepath="/etc"), "images[2].filepath",
     "'/etc' is not a relative path inside the dataset"),
    (lambda images: images[2].update(filepath="../../elsewhere"), "images[2].filepath", "'../../elsewhere' is not"),
    (lambda images: images[3].update(filename="../../../etc/hostname"), "images[3].filename",
     "'../../../etc/hostname' is not a relative"),
    (lambda images: images.append(dict(images[4])), "images[30]", "images[30] ("),
])
def test_karpathy_paths_outside_the_dataset_and_duplicates_are_refused(coco_root, tmp_path, change, field, message):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    json_path = _rewrite_karpathy(root, change)
    with pytest.raises(DataError) as info:
        convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    assert (info.value.file, info.value.field) == (str(json_path), field)
    assert info.value.message.startswith(message)
    if field == "images[30]":
        assert info.value.message.endswith("repeats images[4] (duplicate entries would become duplicate rows; "
                                           "remove one)")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.arrow"))


def test_grounding_paths_and_duplicates_are_refused(flickr_root, tmp_path):
    root = tmp_path / "f30k"
    shutil.copytree(flickr_root, root)
    json_path = root / "mdetr_annotations" / "final_flickr_separateGT_train.json"
    original = json.loads(json_path.read_text())
    for change, field, message in [
        (lambda d: d["images"][1].update(file_name="/etc/passwd"), "images[1].file_name", "'/etc/passwd' is not"),
        (lambda d: d["images"].append(dict(d["images"][0], id=10**9)), f"images[{len(original['images'])}]",
         f"images[{len(original['images'])}] (same image and caption) repeats images[0]"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), f"annotations[{len(original['annotations'])}]",
         f"annotations[{len(original['annotations'])}] repeats annotations[0]"),
    ]:
        data = json.loads(json.dumps(original))
        change(data)
        json_path.write_text(json.dumps(data))
        with pytest.raises(DataError) as info:
            convert_grounding(root, tmp_path / "out", GroundingArrowParams(splits=["train"]))
        assert (info.value.field, info.value.message.startswith(message)) == (field, True), info.value.message


@pytest.mark.parametrize("change,field,message", [
    (lambda d: d["annotations"][0].update(image_id={"a": 1}), "annotations[0].image_id",
     "expected int or str, got dict"),
    (lambda d: d["images"][0].update(id=[1]), "images[0].id", "expected int or str, got list"),
    (lambda d: d["annotations"][0].update(bbox=[1, "a", 2, 3]), "annotations[0]", "expected bbox [x, y, w, h] (finite"),
    (lambda d: d["annotations"][0].update(tokens_positive=[[0, "5"]]), "annotations[0]", "expected bbox"),
    (lambda d: d["annotations"][0].update(tokens_positive=[3]), "annotations[0]", "expected bbox"),
    (lambda d: d["images"][0].update(width=True), "images[0]", "width and height must be positive integers, got True"),
])
def test_grounding_values_of_the_wrong_type(flickr_root, tmp_path, change, field, message):
    root = tmp_path / "f30k"
    shutil.copytree(flickr_root, root)
    json_path = root / "mdetr_annotations" / "final_flickr_separateGT_train.json"
    data = json.loads(json_path.read_text())
    change(data)
    json_path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        convert_grounding(root, tmp_path / "out", GroundingArrowParams(splits=["train"]))
    assert (info.value.field, info.value.message.startswith(message)) == (field, True), info.value.message


def test_unreadable_image_names_are_bad_images(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    _rewrite_karpathy(root, lambda images: images[0].update(filename="x" * 300 + ".jpg"))
    report = convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    assert [b["reason"] for b in report.bad_images] == ["unreadable: File name too long"]


def test_header_only_check_lets_a_truncated_jpeg_through(coco_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    entry = json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"][0]
    path = root / entry["filepath"] / entry["filename"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert convert_coco_karpathy(root, tmp_path / "fast", ArrowParams(image_check="headers")).bad_images == []
    assert len(convert_coco_karpathy(root, tmp_path / "safe", ArrowParams()).bad_images) == 1


def test_record_batches_stay_under_the_binary_offset_limit(coco_root, tmp_path, monkeypatch):
    """A batch whose images pass what int32 offsets address (2 GiB; lowered here to ~2 images) is written as several
    record batches holding the same rows."""
    from vlflow.stages.data import arrow_common

    convert_coco_karpathy(coco_root, tmp_path / "whole", ArrowParams(batch_rows=8))
    sizes = [len(image) for image in read_ipc_file(tmp_path / "whole" / "coco_caption_karpathy_train.arrow")["image"]
             .to_pylist()]
    monkeypatch.setattr(arrow_common, "_MAX_BATCH_BYTES", 2 * max(sizes) + 1)
    convert_coco_karpathy(coco_root, tmp_path / "split", ArrowParams(batch_rows=8))
    name = "coco_caption_karpathy_train.arrow"
    assert read_ipc_file(tmp_path / "split" / name).equals(read_ipc_file(tmp_path / "whole" / name))
    with pa.memory_map(str(tmp_path / "split" / name)) as source:
        batches = pa.ipc.open_file(source)
        assert batches.num_record_batches >= len(sizes) // 2
        assert all(batches.get_batch(i).num_rows <= 2 for i in range(batches.num_record_batches))


def test_an_image_that_changes_size_while_converted_is_a_bad_image(coco_root, tmp_path, monkeypatch):
    """Sizes are taken first (each image gets its place in the batch's buffer), then the file is read: a file that
    grew in between is reported, not cut to its old size."""
    import os

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    entry = next(im for im in json.loads((root / "karpathy" / "dataset_coco.json").read_text())["images"]
                 if im["split"] == "train")
    growing = root / entry["filepath"] / entry["filename"]
    real_stat = os.stat

    def stat_then_grow(path, *args, **kwargs):
        info = real_stat(path, *args, **kwargs)
        if str(path) == str(growing):
            with open(growing, "ab") as handle:  # another process appends right after the size was taken
                handle.write(b"\x00" * 10)
        return info

    monkeypatch.setattr(os, "stat", stat_then_grow)
    report = convert_coco_karpathy(root, tmp_path / "out", ArrowParams())
    assert [(b["path"], b["reason"]) for b in report.bad_images] == \
        [(f"{entry['filepath']}/{entry['filename']}", "unreadable: the file changed size while being converted")]
