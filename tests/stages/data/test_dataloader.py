"""The ViLT input pipeline: ViLT's resize geometry, the in-place uint8 collate with a bool pixel mask, normalisation on
the device (bit-identical to ViLT's host-side ToTensor + Normalize) and a training step that gets the same loss from
uint8 and from float batches."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from vlflow.stages.data.transforms import (
    FAST_PIXEL_TOLERANCE,
    PixelDecoding,
    min_max_size,
    normalize_pixels,
    pixelbert_pixels,
    pixelbert_transform,
    vilt_max_size,
)
from vlflow.stages.text.tokenizer import train_wordpiece
from vlflow.stages.vilt.data import PairCollator, collate_images, device_pixels, pad_images
from vlflow.stages.vilt.model import ViltPretrainingModel, build_config
from vlflow.stages.vilt.spec import ViltPretrainParams
from vlflow.stages.vilt.train import pretrain_task

torch.set_num_threads(1)


def noisy_jpeg(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def vilt_image(data: bytes, size: int, max_size: int) -> torch.Tensor:
    """ViLT's steps (BaseDataset.get_raw_image + pixelbert_transform): PIL decode, convert("RGB"), MinMaxResize
    (bicubic), ToTensor, Normalize(0.5, 0.5)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    resized = image.resize(min_max_size(image.width, image.height, size, max_size), resample=Image.BICUBIC)
    return TF.normalize(TF.to_tensor(resized), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def vilt_collate(images: list[torch.Tensor]) -> torch.Tensor:
    """ViLT's BaseDataset.collate for the image key: a zero float batch, each image written top-left."""
    batch = torch.zeros(len(images), 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images))
    for index, image in enumerate(images):
        batch[index, :, :image.shape[1], :image.shape[2]] = image
    return batch


def test_vilt_longer_side_cap_is_639_at_384():
    assert vilt_max_size(384) == 639 == int(1333 / 800 * 384)
    assert pixelbert_transform(384).max_size == 639 and pixelbert_pixels(384).max_size == 639
    # the worked case: 640x360 -> shorter 384, longer 682.7 > 639 -> 639 x 359.4 -> 608 x 352 (640 x 352 with 640)
    assert min_max_size(640, 360, 384, 639) == (608, 352)
    assert min_max_size(640, 360, 384, 640) == (640, 352)
    assert min_max_size(360, 640, 384, 639) == (352, 608)
    image = Image.fromarray(np.zeros((360, 640, 3), np.uint8))
    assert pixelbert_transform(384)(image).shape == (3, 352, 608)
    assert pixelbert_pixels(384)(noisy_jpeg(640, 360, 0)).shape == (3, 352, 608)


@pytest.mark.parametrize("width, height, mode", [(96, 64, "RGB"), (64, 64, "RGB"), (50, 120, "L")],
                         ids=["resized", "same_size", "grayscale"])
def test_uint8_pixels_normalise_to_vilt_floats_bit_for_bit(width, height, mode):
    data = noisy_jpeg(width, height, seed=width + height, mode=mode)
    pixels = pixelbert_pixels(64, 96)(data)
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
    expected = vilt_image(data, 64, 96)
    assert torch.equal(normalize_pixels(pixels), expected)
    assert torch.equal(pixelbert_transform(64, 96)(Image.open(io.BytesIO(data))), expected)


def test_collate_writes_in_place_pads_with_zero_and_masks_with_bool():
    sizes = [(96, 64), (64, 96), (64, 64)]
    data = [noisy_jpeg(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    pixels = [pixelbert_pixels(64, 96)(d) for d in data]
    values, mask = collate_images(pixels)
    assert values.dtype == torch.uint8 and values.shape == (3, 3, 96, 96)
    assert mask.dtype == torch.bool and mask.shape == (3, 96, 96)
    for index, image in enumerate(pixels):
        _, h, w = image.shape
        assert torch.equal(values[index, :, :h, :w], image)
        assert mask[index, :h, :w].all() and not mask[index, h:].any() and not mask[index, :, w:].any()
        assert not values[index, :, h:].any() and not values[index, :, :, w:].any()
    # normalised (host or device): ViLT's float batch, padding 0, bit for bit
    reference = vilt_collate([vilt_image(d, 64, 96) for d in data])
    assert torch.equal(normalize_pixels(values, mask), reference)
    assert torch.equal(pad_images(pixels)[0], reference)
    assert torch.equal(device_pixels({"pixel_values": values, "pixel_mask": mask})["pixel_values"], reference)
    # float images (already normalised) collate as they are
    floats, float_mask = pad_images([vilt_image(d, 64, 96) for d in data])
    assert torch.equal(floats, reference) and torch.equal(float_mask, mask)


def test_text_padded_to_max_length_as_vilt_when_asked():
    tokenizer = train_wordpiece(iter(["a red circle", "a blue square at the top"] * 5), vocab_size=40,
                                lowercase=True, min_frequency=1)
    samples = [{"pixel_values": torch.zeros(3, 32, 32, dtype=torch.uint8), "text": text, "image_index": i}
               for i, text in enumerate(["a red circle", "a blue square at the top"])]
    longest = PairCollator(tokenizer, 16)(samples)
    padded = PairCollator(tokenizer, 16, pad_to_max_length=True)(samples)
    assert padded["input_ids"].shape == (2, 16) and longest["input_ids"].shape[1] < 16
    length = longest["input_ids"].shape[1]
    assert torch.equal(padded["input_ids"][:, :length], longest["input_ids"])
    assert not padded["attention_mask"][:, length:].any()


def test_pretraining_step_on_uint8_batch_equals_float_batch():
    """What the training loop sends the device (uint8 pixels, normalised in the step) gives the loss of ViLT's
    host-normalised float batch exactly: MLM and ITM (images gathered for negatives after normalising)."""
    texts = ["a red circle at the top", "a blue square", "a green triangle below", "two yellow circles"]
    tokenizer = train_wordpiece(iter(texts * 5), vocab_size=60, lowercase=True, min_frequency=1)
    params = ViltPretrainParams(hidden_size=32, num_layers=1, num_heads=4, patch_size=16, image_size=64,
                                max_image_size=96, max_text_len=16, max_image_len=-1, mlp_ratio=2)
    images = [pixelbert_pixels(64, 96)(noisy_jpeg(w, 64, seed=w)) for w in (64, 96, 80, 128)]
    samples = [{"pixel_values": image, "text": text, "image_index": i}
               for i, (image, text) in enumerate(zip(images, texts))]
    uint8_batch = PairCollator(tokenizer, 16, normalize=False)(samples)
    float_batch = PairCollator(tokenizer, 16)(samples)
    assert uint8_batch["pixel_values"].dtype == torch.uint8 and float_batch["pixel_values"].dtype == torch.float32
    torch.manual_seed(0)
    model = ViltPretrainingModel(build_config(params, len(tokenizer), tokenizer.pad_token_id), ["mlm", "itm"]).eval()
    task = pretrain_task(tokenizer, ["mlm", "itm"], 0.5, False, 0.0)
    losses = []
    for batch in (uint8_batch, float_batch):
        prepared = task.prepare(batch, torch.Generator().manual_seed(3))
        torch.manual_seed(1)
        losses.append(task.losses(model, prepared))
    assert set(losses[0]) == set(losses[1]) and {"mlm_loss", "itm_loss"} <= set(losses[0])
    for name in losses[0]:
        assert torch.equal(losses[0][name], losses[1][name]), name


def test_evaluation_image_batch_normalises_uint8_on_its_device():
    from vlflow.stages.vilt.evaluate import image_batch

    data = [noisy_jpeg(w, 64, seed=w) for w in (64, 96)]
    uint8_batch = image_batch([pixelbert_pixels(64, 96)(d) for d in data], patch_size=32)
    assert uint8_batch.pixel_values.dtype == torch.uint8  # what crosses to the device
    moved = uint8_batch.to(torch.device("cpu"))
    expected = image_batch([vilt_image(d, 64, 96) for d in data], patch_size=32)
    assert torch.equal(moved.pixel_values, expected.pixel_values) and moved.pixel_values.is_contiguous()
    assert torch.equal(moved.pixel_mask, expected.pixel_mask) and moved.grids == expected.grids == [(2, 2), (2, 3)]


def gradient_png(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 3 % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data, size, max_size", [
    (noisy_jpeg(200, 150, seed=1), 96, 160),  # RGB JPEG, downscaled (decode_jpeg + tensor resize)
    (noisy_jpeg(60, 90, seed=2), 96, 160),  # upscaled
    (noisy_jpeg(150, 200, seed=3, mode="L"), 96, 160),  # grayscale JPEG, decoded to RGB by libjpeg-turbo
    (gradient_png(170, 130), 96, 160),  # not a JPEG: PIL decode + tensor resize
    (noisy_jpeg(128, 96, seed=4), 96, 160),  # already at its target size: the exact path
], ids=["jpeg_down", "jpeg_up", "jpeg_gray", "png", "same_size"])
def test_fast_decoding_stays_within_its_stated_tolerance_of_vilt(data, size, max_size):
    fast = pixelbert_pixels(size, max_size, PixelDecoding.fast)
    pixels = fast(data)
    exact = pixelbert_pixels(size, max_size)(data)
    assert pixels.dtype == torch.uint8 and pixels.shape == exact.shape
    difference = (pixels.int() - exact.int()).abs()
    assert difference.max() <= FAST_PIXEL_TOLERANCE.max_levels
    assert difference.float().mean() <= FAST_PIXEL_TOLERANCE.mean_levels
    if exact.shape[1:] == Image.open(io.BytesIO(data)).size[::-1]:
        assert torch.equal(pixels, exact)  # nothing to resize: ViLT's pixels
    # a decoded PIL image (e.g. after RandAugment) takes the same resize
    assert torch.equal(fast.pixels(Image.open(io.BytesIO(data))), pixels)
    assert torch.equal(normalize_pixels(pixels).sub(vilt_image(data, size, max_size)).abs().max().mul(127.5).round(),
                       difference.max().float())


def test_fast_decoding_is_chosen_explicitly_and_travels_to_workers():
    import pickle

    assert pixelbert_pixels(96).decoding is PixelDecoding.exact  # ViLT's pixels unless asked
    fast = pickle.loads(pickle.dumps(pixelbert_pixels(96, 160, "fast")))
    assert fast.decoding is PixelDecoding.fast and "decoding=fast" in repr(fast)
    with pytest.raises(ValueError):
        pixelbert_pixels(96, 160, "quick")


def test_training_stages_choose_the_decoding_with_a_param(tmp_path):
    import pyarrow as pa
    import pydantic
    from vlflow.stages.vilt.pretrain_data import pretraining_images

    assert ViltPretrainParams().image_decoding == "exact"
    with pytest.raises(pydantic.ValidationError, match="image_decoding"):
        ViltPretrainParams(image_decoding="quick")
    table = pa.table({"image": pa.array([noisy_jpeg(120, 80, seed=0)], pa.binary()),
                      "caption": pa.array([["a caption"]], pa.list_(pa.string())), "image_id": ["0.jpg"]})
    with pa.OSFile(str(tmp_path / "coco_caption_karpathy_train.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    params = ViltPretrainParams(image_decoding="fast", image_size=64, max_image_size=96)
    images = pretraining_images({"arrows": tmp_path}, params.image_size, params.max_image_size,
                                PixelDecoding(params.image_decoding))
    assert images.image_transform.decoding is PixelDecoding.fast
    assert images[0]["image"].shape == pixelbert_pixels(64, 96)(noisy_jpeg(120, 80, seed=0)).shape == (3, 64, 96)
