"""ViLT's other pretraining corpora: arrow.vg, arrow.sbu and arrow.gcc against transcriptions of ViLT's writers
(dandelin/ViLT 762fd39 vilt/utils/write_vg.py, write_sbu.py, write_conceptual_caption.py) and of the part of its
BaseDataset that reads arrows (its dataset classes open a fixed list of files), the synthetic generators' layouts,
errors, and the pretraining mix of vilt.pretrain."""
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from glob import glob

import pyarrow as pa
import pytest
from vlflow.stages.data.arrow_stream import checked_rows
from vlflow.stages.data.arrow_vg import VG_SCHEMA, convert_vg
from vlflow.stages.data.arrow_webcaps import convert_gcc, convert_sbu
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.spec import (
    ArrowParams,
    GccArrowParams,
    SyntheticCocoParams,
    SyntheticGccParams,
    SyntheticSbuParams,
    SyntheticVgParams,
    WebCaptionArrowParams,
)
from vlflow.stages.data.synthetic import generate_coco, generate_gcc, generate_sbu, generate_vg

SHARD = 4  # rows per shard in these tests (ViLT: 100,000)


# ---------------------------------------------------------------------------------------------------------------
# Transcriptions of ViLT's code (pandas.DataFrame + Table.from_pandas replaced by Table.from_pylist: same types;
# `shard` stands for the hard-coded 100000).


def vilt_write_vg(root, dataset_root):
    with open(f"{root}/annotations/region_descriptions.json", "r") as fp:
        captions = json.load(fp)
    iid2captions = defaultdict(list)
    for cap in captions:
        for c in cap["regions"]:
            iid2captions[c["image_id"]].append(c)
    paths = list(glob(f"{root}/images/VG_100K/*.jpg")) + list(glob(f"{root}/images/VG_100K_2/*.jpg"))
    random.shuffle(paths)
    caption_paths = [path for path in paths if int(path.split("/")[-1][:-4]) in iid2captions]
    rows = []
    for path in caption_paths:
        iid = int(path.split("/")[-1][:-4])
        cdicts = iid2captions[iid]
        rows.append({"image": open(path, "rb").read(), "caption": [c["phrase"] for c in cdicts],
                     "width": [c["width"] for c in cdicts], "height": [c["height"] for c in cdicts],
                     "x": [c["x"] for c in cdicts], "y": [c["y"] for c in cdicts], "image_id": str(iid)})
    write_table(pa.Table.from_pylist(rows), f"{dataset_root}/vg.arrow")


def vilt_write_web(root, dataset_root, annotation_of, name_of, shard):
    """write_sbu.make_arrow (annotation_of {"train": "annot.json"}) / write_conceptual_caption.make_arrow."""
    for split, annotation in annotation_of.items():
        with open(f"{root}/{annotation}", "r") as fp:
            captions = json.load(fp)
        iid2captions = {cap[0].split("/")[-1]: [cap[1]] for cap in captions}
        paths = list(glob(f"{root}/images_{split}/*/*"))
        random.shuffle(paths)
        caption_paths = [path for path in paths if path.split("/")[-1] in iid2captions]
        for sub in range(len(caption_paths) // shard + 1):
            rows = []
            for path in caption_paths[sub * shard: (sub + 1) * shard]:
                split_, _, name = path.split("/")[-3:]
                rows.append({"image": open(path, "rb").read(), "caption": iid2captions[name], "image_id": name,
                             "split": split_.split("_")[-1]})
            columns = ["image", "caption", "image_id", "split"]
            table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.null()) for c in columns})
            write_table(table, f"{dataset_root}/{name_of(split, sub)}")


def write_table(table, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pa.OSFile(path, "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)


class ViltBaseDataset:
    """BaseDataset.__init__'s reading of the arrows and get_text/get_raw_image's lookups (text_column_name
    "caption", remove_duplicate=True); the names are those of its dataset classes."""

    def __init__(self, data_dir, names):
        tables = [pa.ipc.RecordBatchFileReader(pa.memory_map(f"{data_dir}/{name}.arrow", "r")).read_all()
                  for name in names if os.path.isfile(f"{data_dir}/{name}.arrow")]
        self.table_names = []
        for i, name in enumerate(names):
            self.table_names += [name] * len(tables[i])  # IndexError when one of `names` is missing
        self.table = pa.concat_tables(tables, promote_options="default")  # ViLT's pyarrow 2: promote=True
        self.all_texts = [list(set(texts)) for texts in self.table["caption"].to_pylist()]
        self.index_mapper = {}
        j = 0
        for i, texts in enumerate(self.all_texts):
            for _j in range(len(texts)):
                self.index_mapper[j] = (i, _j)
                j += 1

    def items(self):
        """(image_id, image bytes, text) of every index."""
        out = []
        for index in range(len(self.index_mapper)):
            i, j = self.index_mapper[index]
            out.append((self.table["image_id"][i].as_py(), self.table["image"][i].as_py(), self.all_texts[i][j]))
        return out


VILT_NAMES = {"vg": ["vg"], "sbu": [f"sbu_{i}" for i in range(9)],
              "gcc_train": [f"conceptual_caption_train_{i}" for i in range(30)],
              "gcc_val": ["conceptual_caption_val_0"]}


def read(path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: synthetic corpora in ViLT's layouts, with the irregularities of the real ones.


@pytest.fixture(scope="module")
def vg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vg")
    generate_vg(root, SyntheticVgParams(num_images=10, image_size=32, seed=3, duplicate_fraction=0.5))
    entries = json.loads((root / "annotations" / "region_descriptions.json").read_text())
    # an image's regions spread over two entries (ViLT's defaultdict merges them into one row)
    extra = dict(entries[2]["regions"][0], region_id=10_000, phrase="one more region")
    entries.append({"regions": [extra], "id": extra["image_id"]})
    (root / "annotations" / "region_descriptions.json").write_text(json.dumps(entries))
    # an annotated image whose file is missing, and a file without regions: neither becomes a row
    missing = entries[5]["id"]
    next(p for p in (root / "images").glob(f"*/{missing}.jpg")).unlink()
    shutil.copy(next((root / "images").glob("*/*.jpg")), root / "images" / "VG_100K" / "4242424.jpg")
    return root


@pytest.fixture(scope="module")
def sbu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sbu")
    generate_sbu(root, SyntheticSbuParams(num_images=14, image_size=32, seed=4, missing_fraction=0.2))
    return root


@pytest.fixture(scope="module")
def gcc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcc")
    generate_gcc(root, SyntheticGccParams(num_images=16, image_size=32, seed=5, missing_fraction=0.1,
                                          splits={"train": 13, "val": 3}))
    return root


PARAMS = ArrowParams(batch_rows=3, read_threads=2)


def test_synthetic_layouts_are_vilts(vg_root, sbu_root, gcc_root):
    entries = json.loads((vg_root / "annotations" / "region_descriptions.json").read_text())
    assert {"regions", "id"} == set(entries[0])
    assert set(entries[0]["regions"][0]) == {"region_id", "width", "height", "image_id", "phrase", "y", "x"}
    assert all(r["image_id"] == e["id"] for e in entries for r in e["regions"])
    assert any(len({r["phrase"] for r in e["regions"]}) < len(e["regions"]) for e in entries)  # repeated phrases
    for folder in ("VG_100K", "VG_100K_2"):
        assert list((vg_root / "images" / folder).glob("*.jpg"))
    pairs = json.loads((sbu_root / "annot.json").read_text())
    assert len(pairs) == 14 and all(isinstance(c, str) for pair in pairs for c in pair)
    present = [p for p, _ in pairs if (sbu_root / p).is_file()]
    assert 0 < len(present) < 14  # dead URLs
    assert all(p.startswith(f"images_train/{p.split('/')[-1][:4]}/") for p, _ in pairs)  # first four letters
    for split, count in (("train", 13), ("val", 3)):
        assert len(json.loads((gcc_root / f"{split}_annot.json").read_text())) == count


def test_vg_arrow_holds_what_vilts_writer_writes(vg_root, tmp_path):
    report = convert_vg(vg_root, tmp_path / "ours", PARAMS)
    vilt_write_vg(vg_root, tmp_path / "vilt")
    ours, vilt = read(tmp_path / "ours" / "vg.arrow"), read(tmp_path / "vilt" / "vg.arrow")
    assert ours.schema.equals(VG_SCHEMA) and [f.type for f in vilt.schema] == [f.type for f in ours.schema]
    assert ours.num_rows == vilt.num_rows == 9  # 10 annotated, one file missing; the unannotated file left out
    by_id = {row["image_id"]: row for row in vilt.to_pylist()}
    assert {row["image_id"]: row for row in ours.to_pylist()} == by_id  # every column, caption order included
    merged = [row for row in by_id.values() if "one more region" in row["caption"]]
    assert len(merged) == 1 and len(merged[0]["caption"]) == len(merged[0]["x"]) > 1
    assert report.splits["train"]["annotated_images_missing"] == 1
    assert report.splits["train"]["images_without_regions"] == 1
    # ViLT's dataset class reads both to the same items (its caption order within an image is a set's)
    assert (sorted(ViltBaseDataset(tmp_path / "ours", VILT_NAMES["vg"]).items())
            == sorted(ViltBaseDataset(tmp_path / "vilt", VILT_NAMES["vg"]).items()))


@pytest.mark.parametrize("corpus", ["sbu", "gcc"])
def test_shards_hold_what_vilts_writers_write_and_vilts_classes_read_them(corpus, sbu_root, gcc_root, tmp_path):
    if corpus == "sbu":
        root, annotation_of = sbu_root, {"train": "annot.json"}
        report = convert_sbu(root, tmp_path / "ours", WebCaptionArrowParams(batch_rows=3, shard_rows=SHARD))
        name_of = lambda split, i: f"sbu_{i}.arrow"  # noqa: E731
        reads = {"train": VILT_NAMES["sbu"]}
    else:
        root, annotation_of = gcc_root, {"val": "val_annot.json", "train": "train_annot.json"}
        report = convert_gcc(root, tmp_path / "ours", GccArrowParams(batch_rows=3, shard_rows=SHARD))
        name_of = lambda split, i: f"conceptual_caption_{split}_{i}.arrow"  # noqa: E731
        reads = {"train": VILT_NAMES["gcc_train"], "val": VILT_NAMES["gcc_val"]}
    vilt_write_web(root, tmp_path / "vilt", annotation_of, name_of, SHARD)
    for split in annotation_of:
        vilt_files = sorted((tmp_path / "vilt").glob(name_of(split, "*")), key=lambda p: int(p.stem.split("_")[-1]))
        rows = sum(read(p).num_rows for p in vilt_files)
        assert len(vilt_files) == rows // SHARD + 1  # ViLT's shard count, the last one possibly empty
        for k, vilt_file in enumerate(vilt_files):  # the same shards with the same row counts and types
            ours = read(tmp_path / "ours" / vilt_file.name)
            assert ours.num_rows == read(vilt_file).num_rows
            assert [f.type for f in ours.schema] == [pa.binary(), pa.list_(pa.string()), pa.string(), pa.string()]
        assert report.splits[split]["rows"] == rows
        # ViLT's own class opens a fixed list of shards: on ViLT's output for a small corpus it fails, on ours it
        # reads the same items as from ViLT's files
        if len(vilt_files) < len(reads[split]):
            with pytest.raises(IndexError):
                ViltBaseDataset(tmp_path / "vilt", reads[split])
        ours = ViltBaseDataset(tmp_path / "ours", reads[split])
        theirs = ViltBaseDataset(tmp_path / "vilt", [p.stem for p in vilt_files])
        assert sorted(ours.items()) == sorted(theirs.items()) and len(ours.items()) == rows
        assert all(ours.table["split"].to_pylist()) and set(ours.table["split"].to_pylist()) == {split}


def test_gcc_splits_left_out_are_written_empty(gcc_root, tmp_path):
    report = convert_gcc(gcc_root, tmp_path, GccArrowParams(splits=["train"], shard_rows=SHARD))
    assert report.splits["val"]["rows"] == 0 and read(tmp_path / "conceptual_caption_val_0.arrow").num_rows == 0
    assert ViltBaseDataset(tmp_path, VILT_NAMES["gcc_val"]).items() == []
    assert len(ViltBaseDataset(tmp_path, VILT_NAMES["gcc_train"]).items()) == report.splits["train"]["rows"] > 0


def test_bad_images_are_skipped_and_reported(sbu_root, tmp_path):
    root = tmp_path / "sbu"
    shutil.copytree(sbu_root, root)
    victim = sorted((root / "images_train").glob("*/*"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    report = convert_sbu(root, tmp_path / "out", WebCaptionArrowParams(batch_rows=2))
    assert [b["path"] for b in report.bad_images] == [str(victim.relative_to(root))]
    assert victim.name not in read(tmp_path / "out" / "sbu_0.arrow")["image_id"].to_pylist()
    with pytest.raises(DataError, match="bad image"):
        convert_sbu(root, tmp_path / "fail", WebCaptionArrowParams(on_bad_image="fail"))


@pytest.mark.parametrize("change, message, field", [
    (lambda e: e[1]["regions"][0].update(phrase=7), "expected str", "[1].regions[0].phrase"),
    (lambda e: e[0]["regions"][1].update(x=True), "expected int, got bool", "[0].regions[1].x"),
    (lambda e: e[2]["regions"][0].pop("image_id"), "missing key 'image_id'", "[2].regions[0].image_id"),
])
def test_vg_annotation_errors_name_file_and_field(vg_root, tmp_path, change, message, field):
    root = tmp_path / "vg"
    shutil.copytree(vg_root, root)
    path = root / "annotations" / "region_descriptions.json"
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=message) as err:
        convert_vg(root, tmp_path / "out", PARAMS)
    assert field in str(err.value) and "region_descriptions.json" in str(err.value)
    assert not list((tmp_path / "out").glob("*.arrow*"))  # nothing half-written


def test_layout_errors(vg_root, sbu_root, gcc_root, tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        convert_vg(tmp_path / "nothing", tmp_path / "o1", PARAMS)
    gcc = tmp_path / "gcc"
    shutil.copytree(gcc_root, gcc)
    (gcc / "val_annot.json").unlink()
    with pytest.raises(DataError, match="val_annot.json beside images_val/.*`splits` names the splits") as err:
        convert_gcc(gcc, tmp_path / "o0", GccArrowParams())
    assert err.value.file.endswith("val_annot.json")
    root = tmp_path / "vg"
    shutil.copytree(vg_root, root)
    shutil.copy(next((root / "images" / "VG_100K").glob("*.jpg")), root / "images" / "VG_100K" / "copy.jpg")
    with pytest.raises(DataError, match="named <image id>.jpg"):
        convert_vg(root, tmp_path / "o2", PARAMS)
    (root / "images" / "VG_100K" / "copy.jpg").unlink()
    some = next((root / "images" / "VG_100K").glob("*.jpg"))
    shutil.copy(some, root / "images" / "VG_100K_2" / some.name)
    with pytest.raises(DataError, match="two rows"):
        convert_vg(root, tmp_path / "o3", PARAMS)

    root = tmp_path / "sbu"
    shutil.copytree(sbu_root, root)
    pairs = json.loads((root / "annot.json").read_text())
    (root / "annot.json").write_text(json.dumps(pairs + [["elsewhere/" + pairs[0][0].split("/")[-1], "again"]]))
    with pytest.raises(DataError, match=r"repeats entry \[0\]"):
        convert_sbu(root, tmp_path / "o4", WebCaptionArrowParams())
    (root / "annot.json").write_text(json.dumps([["a", 1]]))
    with pytest.raises(DataError, match=r"\[image path, caption\] pair"):
        convert_sbu(root, tmp_path / "o5", WebCaptionArrowParams())
    (root / "annot.json").write_text("[[\"a\", \"b\"]")
    with pytest.raises(DataError, match="invalid JSON"):
        convert_sbu(root, tmp_path / "o6", WebCaptionArrowParams())
    (root / "annot.json").write_bytes(b'[["images_train/0000/0000000", "caf\xe9"]]')
    with pytest.raises(DataError, match="invalid JSON: lexical error: invalid bytes in UTF8 string.$"):
        convert_sbu(root, tmp_path / "o6", WebCaptionArrowParams())
    (root / "annot.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="expected a JSON list at the top level"):
        convert_sbu(root, tmp_path / "o6", WebCaptionArrowParams())
    (root / "annot.json").write_text(json.dumps([["x/none", "nothing matches"]]))
    with pytest.raises(DataError, match="no file in images_train"):
        convert_sbu(root, tmp_path / "o7", WebCaptionArrowParams())


def test_images_are_read_a_bounded_number_of_rows_ahead(sbu_root):
    """The row stream is consumed lazily: at most two record batches of rows are ahead of the writer."""
    from concurrent.futures import ThreadPoolExecutor

    from vlflow.stages.data.arrow_common import ImageRow

    image = next((sbu_root / "images_train").glob("*/*"))
    pulled = 0

    def rows():
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield ImageRow(image, {})

    with ThreadPoolExecutor(2) as pool:
        stream = checked_rows(rows(), pool, batch_rows=8, decode="structure")
        for seen in range(1, 30):
            row, check = next(stream)
            assert check.data is not None and pulled <= (seen // 8 + 2) * 8


def test_stage_types_are_registered_and_follow_the_contract(vg_root, gcc_root, tmp_path):
    from vlflow.stage import StageContext, get_spec

    for name, root, rows in (("arrow.vg", vg_root, {"train": 9}), ("arrow.gcc", gcc_root, None)):
        spec = get_spec(name)
        ctx = StageContext(stage="a", params=spec.params(), inputs={"root": root}, output_dir=tmp_path / name)
        metrics = spec.load()(ctx)
        assert json.loads(json.dumps(metrics)) == metrics
        if rows:
            assert metrics["rows"] == rows
    assert get_spec("arrow.sbu").params().shard_rows == 100_000
    for name, params in (("synthetic.vg", {"num_images": 3, "image_size": 32}),
                         ("synthetic.sbu", {"num_images": 3, "image_size": 32})):
        spec = get_spec(name)
        ctx = StageContext(stage="s", params=spec.params.model_validate(params), inputs={},
                           output_dir=tmp_path / name)
        assert spec.load()(ctx)["images"] <= 3
    with pytest.raises(ValueError, match="one split"):
        SyntheticSbuParams(splits={"val": 1.0})


def test_pretraining_mixes_the_datasets_as_vilts_concat(vg_root, sbu_root, gcc_root, tmp_path):
    """vilt.pretrain with vg/sbu/gcc inputs: COCO train + restval, then the three datasets' training files, one
    index per image; the added datasets' items are ViLT's (repeated captions once); without them, COCO alone."""
    from vlflow.stages.data.arrow_coco import convert_coco_karpathy
    from vlflow.stages.vilt.data import CaptionPairs, image_dataset
    from vlflow.stages.vilt.pretrain_data import pretraining_images

    generate_coco(tmp_path / "coco", SyntheticCocoParams(num_images=10, image_size=32, seed=6))
    convert_coco_karpathy(tmp_path / "coco", tmp_path / "coco_arrows", PARAMS)
    convert_vg(vg_root, tmp_path / "vg", PARAMS)
    convert_sbu(sbu_root, tmp_path / "sbu", WebCaptionArrowParams(shard_rows=SHARD))
    convert_gcc(gcc_root, tmp_path / "gcc", GccArrowParams(shard_rows=SHARD))
    alone = pretraining_images({"arrows": tmp_path / "coco_arrows"}, 32, 48)
    assert alone.arrow_paths == image_dataset(tmp_path / "coco_arrows", "train", 32, 48).arrow_paths

    inputs = {"arrows": tmp_path / "coco_arrows", "vg": tmp_path / "vg", "sbu": tmp_path / "sbu",
              "gcc": tmp_path / "gcc"}
    mixed = pretraining_images(inputs, 32, 48)
    pairs = CaptionPairs(mixed)
    coco_pairs = len(CaptionPairs(alone))
    vilt = [ViltBaseDataset(tmp_path / "vg", VILT_NAMES["vg"]), ViltBaseDataset(tmp_path / "sbu", VILT_NAMES["sbu"]),
            ViltBaseDataset(tmp_path / "gcc", VILT_NAMES["gcc_train"])]
    assert len(pairs) == coco_pairs + sum(len(d.index_mapper) for d in vilt)
    added = Counter()
    for index in range(coco_pairs, len(pairs)):
        image_index, caption_index = pairs.pairs[index]
        added[(mixed.image_id(image_index), mixed.captions(image_index)[caption_index])] += 1
    assert added == Counter((image_id, text) for d in vilt for image_id, _, text in d.items())
    assert len(mixed) == len(alone) + sum(d.table.num_rows for d in vilt)  # one index per image of every corpus
    item = pairs[len(pairs) - 1]
    assert item["pixel_values"].dtype.is_floating_point is False and item["pixel_values"].shape[0] == 3
    import pickle

    assert len(CaptionPairs(pickle.loads(pickle.dumps(mixed)))) == len(pairs)  # DataLoader workers re-open it
