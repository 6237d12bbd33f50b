"""Readers over the arrows and ViLT's pixelbert transform."""
import pickle

import pytest
import torch
from PIL import Image
from vlflow.stages.data.arrow_coco import convert_coco_karpathy
from vlflow.stages.data.arrow_grounding import convert_grounding
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.reader import CaptionArrowDataset, GroundingArrowDataset, open_arrow
from vlflow.stages.data.spec import ArrowParams, GroundingArrowParams, SyntheticCocoParams, SyntheticFlickrParams
from vlflow.stages.data.synthetic import generate_coco, generate_flickr30k
from vlflow.stages.data.transforms import min_max_size, pixelbert_transform


@pytest.fixture(scope="module")
def arrows(tmp_path_factory):
    base = tmp_path_factory.mktemp("reader")
    generate_coco(base / "coco", SyntheticCocoParams(num_images=20, image_size=80, seed=0))
    convert_coco_karpathy(base / "coco", base / "coco_arrows", ArrowParams())
    generate_flickr30k(base / "f30k", SyntheticFlickrParams(num_images=6, image_size=80, seed=0))
    convert_grounding(base / "f30k", base / "grounding", GroundingArrowParams())
    return base


def test_caption_dataset_concatenates_train_and_restval(arrows):
    paths = [arrows / "coco_arrows" / f"coco_caption_karpathy_{s}.arrow" for s in ("train", "restval")]
    train, restval = open_arrow(paths[0]), open_arrow(paths[1])
    dataset = CaptionArrowDataset(paths)
    assert len(dataset) == train.num_rows + restval.num_rows
    last = len(dataset) - 1
    assert dataset.image_id(0) == train["image_id"][0].as_py()
    assert dataset.image_id(last) == restval["image_id"][-1].as_py()
    assert dataset.captions(last) == restval["caption"][-1].as_py() and len(dataset.captions(last)) == 5
    item = dataset[train.num_rows]
    assert isinstance(item["image"], Image.Image) and item["image"].size == (80, 80)
    assert item["image_id"] == restval["image_id"][0].as_py() and item["index"] == train.num_rows
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_caption_dataset_with_transform_and_dataloader(arrows):
    paths = [arrows / "coco_arrows" / "coco_caption_karpathy_train.arrow"]
    dataset = CaptionArrowDataset(paths, image_transform=pixelbert_transform(size=64, max_size=96))
    image = dataset[0]["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
    clone = pickle.loads(pickle.dumps(dataset))  # what DataLoader workers receive
    assert torch.equal(clone[3]["image"], dataset[3]["image"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=list)
    assert sum(len(batch) for batch in loader) == len(dataset)


def test_grounding_dataset_items(arrows):
    dataset = GroundingArrowDataset([arrows / "grounding" / "f30k_grounding_train.arrow"],
                                    image_transform=pixelbert_transform(size=64, max_size=96))
    item = dataset[0]
    assert set(item) >= {"image", "caption", "phrases", "image_id", "width", "height"}
    _, h, w = item["image"].shape
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) <= 64 and max(h, w) <= 96
    for phrase in item["phrases"]:
        assert phrase["text"] == item["caption"][phrase["start"]:phrase["end"]]
        assert all(0 <= v <= 1 for box in phrase["boxes"] for v in box)


@pytest.mark.parametrize("size,max_size,image_size,expected", [
    (384, 640, (640, 480), (512, 384)),     # landscape: shorter side 384
    (384, 640, (480, 640), (384, 512)),     # portrait
    (384, 640, (2000, 500), (640, 160)),    # longer side capped at 640
    (64, 96, (100, 100), (64, 64)),
    (64, 96, (130, 97), (64, 64)),          # 85.8 -> 85 -> rounded down to 64
    (64, 96, (3000, 40), (96, 32)),         # never below 32
])
def test_pixelbert_sizes(size, max_size, image_size, expected):
    assert min_max_size(*image_size, size, max_size) == expected
    tensor = pixelbert_transform(size, max_size)(Image.new("RGB", image_size, (255, 0, 0)))
    assert tuple(tensor.shape) == (3, expected[1], expected[0])
    assert tensor[0].mean().item() == pytest.approx(1.0) and tensor[1].mean().item() == pytest.approx(-1.0)


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="arrow file not found"):
        open_arrow(tmp_path / "nope.arrow")
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="bad.arrow: not an Arrow IPC file"):
        CaptionArrowDataset([tmp_path / "bad.arrow"])
    with pytest.raises(ValueError, match="size"):
        pixelbert_transform(16, 96)
