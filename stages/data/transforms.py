"""Image transforms matching ViLT's `pixelbert_transform` (MinMaxResize + ToTensor + normalise mean/std 0.5).

Two outputs of the same resize:
- `PixelBertTransform(image)`: FloatTensor[3, H, W] in [-1, 1], ViLT's tensor;
- `PixelBertTransform.pixels(...)`: the resized uint8 pixels [3, H, W] (a quarter of the bytes through DataLoader
  workers and host->device copies); `normalize_pixels` turns them, on whatever device they are, into exactly ViLT's
  floats (the same float32 operations as ToTensor + Normalize, so the values are bit-identical).

Decoding (`PixelDecoding`):
- `exact` (the default): PIL, as ViLT, bit for bit. The RGB conversion and the resize are skipped where they would only
  copy (an RGB JPEG; an image already at its target size): the pixels are the same.
- `fast`: images that need a resize are decoded by torchvision.io.decode_jpeg (libjpeg-turbo; the same pixels as
  PIL's decode) and resized by torch's antialiased bicubic on uint8 (its AVX2 kernel; PIL's filter with a = -0.5,
  fixed-point weights of lower precision): ~3x faster than PIL's resize; decode + resize of benchmarks/dataloader.py's
  512 px JPEGs ~2.2 instead of 4.4 ms an image on average. Pixels differ from ViLT's within `FAST_PIXEL_TOLERANCE`
  (tests/stages/data/test_dataloader.py and the benchmark
  check it): at most 2 grey levels, on ~1% of the values. Images already
  at their target size take the exact path (PIL's HWC pixels need no transposing copy in the collate).
Measured and not used: PIL's `draft` (JPEG DCT scaling by 1/2, 1/4, 1/8) and `reducing_gap` (a box reduce before
the bicubic) do nothing below twice the target size (COCO's 640 px images go to 384-512 px), and from 2x on they
change the pixels far beyond the tolerance (mean 8-16 levels on a noisy 1024 px JPEG).
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

#: ViLT's pixelbert_transform caps the longer side at int(1333 / 800 * size) (detectron's 800/1333 ratio)
VILT_LONGER_RATIO = 1333 / 800


def vilt_max_size(size: int) -> int:
    """ViLT's longer-side cap for shorter side `size`: int(1333 / 800 * size), 639 for 384."""
    return int(VILT_LONGER_RATIO * size)


def min_max_size(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """ViLT's MinMaxResize target (width, height): shorter side -> size, longer <= max_size, multiples of 32.

    The same arithmetic as ViLT (vilt/transforms/utils.py): the shorter side is set to `size` exactly, the longer
    scaled, both shrunk when the longer exceeds `max_size`, rounded half up, then floored to a multiple of 32. E.g. a
    640x360 image at size 384, max_size 639 is 608x352. One deviation: a side never collapses below 32 (ViLT would
    make a very elongated image 0 pixels wide)."""
    scale = size / min(width, height)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    new_w, new_h = int(new_w + 0.5) // 32 * 32, int(new_h + 0.5) // 32 * 32
    return max(new_w, 32), max(new_h, 32)


def normalize_pixels(pixel_values, pixel_mask=None):
    """uint8 pixels [..., 3, H, W] -> ViLT's floats: ToTensor (x / 255) then Normalize(0.5, 0.5), the same float32
    operations in the same order, so equal bit for bit on any device; contiguous whatever the input's layout.
    Where `pixel_mask` (bool [..., H, W]) is False (batch padding) the value is 0, as ViLT's collate pads after
    normalising. Float input is returned as is."""
    import torch

    if pixel_values.dtype != torch.uint8:
        return pixel_values
    values = pixel_values.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(0.5).div_(0.5)
    if pixel_mask is not None:
        values.masked_fill_(~pixel_mask.bool().unsqueeze(-3), 0.0)
    return values


class PixelDecoding(str, Enum):
    """How the ViLT readers turn encoded images into resized uint8 pixels (see the module docstring)."""

    exact = "exact"  # PIL decode + PIL bicubic: ViLT's pixels bit for bit
    fast = "fast"  # libjpeg-turbo through torchvision + torch's uint8 antialiased bicubic: within FAST_PIXEL_TOLERANCE


@dataclass(frozen=True)
class PixelTolerance:
    """How far `fast` pixels may be from ViLT's (uint8 levels): the largest difference of any value, and the mean
    absolute difference over an image's values."""

    max_levels: int
    mean_levels: float


#: measured: max 2 levels, mean <= 0.012 levels on noise, photos and gradients, down- and upscaled
FAST_PIXEL_TOLERANCE = PixelTolerance(max_levels=2, mean_levels=0.02)


def decode_rgb(data: bytes) -> Image.Image:
    """JPEG/PNG bytes -> an RGB PIL image (converted only when the file is not RGB already)."""
    image = Image.open(io.BytesIO(data))
    return image if image.mode == "RGB" else image.convert("RGB")


@functools.cache
def _decode_jpeg():
    """torchvision's libjpeg-turbo decoder (decode_jpeg, the RGB read mode): ~0.5 ms faster a 512 px image than PIL's
    decode and copy to an array (the same pixels). torchvision 0.29 deprecates its image codecs in favour of
    TorchCodec: None where a later torchvision has removed it, and PIL decodes."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return decode_jpeg, ImageReadMode.RGB


def image_pixels(image: Image.Image):
    """An RGB PIL image's pixels as uint8 [3, H, W]: a channels-first view of PIL's HWC copy (flagged read-only by
    numpy; nothing writes to it, the collate only reads)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def tensor_resize(pixels, target: tuple[int, int]):
    """uint8 [3, H, W] -> uint8 [3, height, width] for target (width, height): torch's antialiased bicubic, PIL's
    filter (within FAST_PIXEL_TOLERANCE of PIL's resize)."""
    import torch

    width, height = target
    return torch.nn.functional.interpolate(pixels.unsqueeze(0), size=(height, width), mode="bicubic",
                                           antialias=True)[0]


class PixelBertTransform:
    """PIL image -> FloatTensor[3, H, W] in [-1, 1], H and W multiples of 32 (bicubic resize). Picklable.

    `pixels(image or bytes)`: the same resize as uint8 [3, H, W] (normalise later with `normalize_pixels`)."""

    def __init__(self, size: int = 384, max_size: int | None = None,
                 decoding: PixelDecoding = PixelDecoding.exact):
        max_size = vilt_max_size(size) if max_size is None else max_size
        if size < 32 or max_size < size:
            raise ValueError(f"pixelbert_transform: need 32 <= size <= max_size, got size={size}, max_size={max_size}")
        self.size, self.max_size = size, max_size
        self.decoding = PixelDecoding(decoding)

    def resized(self, image: Image.Image) -> Image.Image:
        image = image if image.mode == "RGB" else image.convert("RGB")
        target = min_max_size(image.width, image.height, self.size, self.max_size)
        # resizing to the same size is a copy in PIL: skip it (same pixels)
        return image if target == image.size else image.resize(target, resample=Image.BICUBIC)

    def pixels(self, image: Image.Image | bytes):
        """uint8 [3, H, W] (a view of the resized image's pixels, channels first)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            if self.decoding is PixelDecoding.fast:
                return self._fast_pixels(image)
            image = decode_rgb(image)
        if self.decoding is PixelDecoding.fast:
            image = image if image.mode == "RGB" else image.convert("RGB")
            target = min_max_size(image.width, image.height, self.size, self.max_size)
            return image_pixels(image) if target == image.size else tensor_resize(image_pixels(image), target)
        return image_pixels(self.resized(image))

    def _fast_pixels(self, data):
        """`PixelDecoding.fast` on encoded bytes: the header says the size; only images that need a resize leave
        PIL (torchvision's CHW output would cost a transposing copy that PIL's HWC pixels do not need)."""
        import torch

        image = Image.open(io.BytesIO(data))  # reads the header only
        target = min_max_size(image.width, image.height, self.size, self.max_size)
        if target == image.size:
            return image_pixels(image if image.mode == "RGB" else image.convert("RGB"))
        if image.format == "JPEG" and image.mode in ("RGB", "L") and _decode_jpeg() is not None:
            decode_jpeg, rgb = _decode_jpeg()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: decode_jpeg only reads it
                warnings.simplefilter("ignore", DeprecationWarning)  # said in _decode_jpeg
                decoded = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=rgb)
            return tensor_resize(decoded, target)
        return tensor_resize(image_pixels(image if image.mode == "RGB" else image.convert("RGB")), target)

    def __call__(self, image: Image.Image):
        return normalize_pixels(self.pixels(image))

    def __repr__(self) -> str:
        return f"pixelbert_transform(size={self.size}, max_size={self.max_size}{self._decoding_repr()})"

    def _decoding_repr(self) -> str:
        return "" if self.decoding is PixelDecoding.exact else f", decoding={self.decoding.value}"


class PixelBertPixels(PixelBertTransform):
    """As PixelBertTransform, but the readers give it the encoded bytes and it returns the uint8 pixels (what the
    ViLT loaders use: normalisation happens on the device, `normalize_pixels`)."""

    takes_bytes = True

    def __call__(self, data: bytes):
        return self.pixels(data)

    def __repr__(self) -> str:
        return f"pixelbert_pixels(size={self.size}, max_size={self.max_size}{self._decoding_repr()})"


def pixelbert_transform(size: int = 384, max_size: int | None = None,
                        decoding: PixelDecoding = PixelDecoding.exact) -> PixelBertTransform:
    """ViLT's default image transform: shorter side `size`, longer side <= `max_size` (default ViLT's
    int(1333 / 800 * size): 639 for 384), float output in [-1, 1]."""
    return PixelBertTransform(size, max_size, decoding)


def pixelbert_pixels(size: int = 384, max_size: int | None = None,
                     decoding: PixelDecoding = PixelDecoding.exact) -> PixelBertPixels:
    """The same resize on encoded bytes, uint8 output (normalise with `normalize_pixels`)."""
    return PixelBertPixels(size, max_size, decoding)


# ---------------------------------------------------------------------------------------------------------------
# ViLT's RandAugment (`pixelbert_randaug`: RandAugment(2, 9) on the decoded image, then the pixelbert resize)


def _random_sign(value: float, rng) -> float:
    return -value if rng.random() > 0.5 else value


def _affine(image: Image.Image, coefficients: tuple) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients)  # nearest, black fill (as ViLT)


def _solarize_add(image: Image.Image, addition: float, threshold: int = 128) -> Image.Image:
    added = np.clip(np.asarray(image).astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(added), threshold)


#: ViLT's op list (vilt/transforms/randaug.py `augment_list`, the EfficientNet RandAugment policy): name, operation
#: (image, magnitude value, rng), and the value range that the magnitude 0..30 maps onto linearly. Invert and Cutout
#: are commented out in ViLT's list, so they are absent; there is no Identity. Ops with a sign flip it with
#: probability 1/2 (rng.random() > 0.5, as ViLT), the enhance factors and thresholds are used as they are.
VILT_RANDAUG_OPS: tuple[tuple[str, Callable, float, float], ...] = (
    ("AutoContrast", lambda img, v, rng: ImageOps.autocontrast(img), 0, 1),
    ("Equalize", lambda img, v, rng: ImageOps.equalize(img), 0, 1),
    ("Rotate", lambda img, v, rng: img.rotate(_random_sign(v, rng)), 0, 30),
    ("Posterize", lambda img, v, rng: ImageOps.posterize(img, max(1, int(v))), 0, 4),
    ("Solarize", lambda img, v, rng: ImageOps.solarize(img, v), 0, 256),
    ("SolarizeAdd", lambda img, v, rng: _solarize_add(img, v), 0, 110),
    ("Color", lambda img, v, rng: ImageEnhance.Color(img).enhance(v), 0.1, 1.9),
    ("Contrast", lambda img, v, rng: ImageEnhance.Contrast(img).enhance(v), 0.1, 1.9),
    ("Brightness", lambda img, v, rng: ImageEnhance.Brightness(img).enhance(v), 0.1, 1.9),
    ("Sharpness", lambda img, v, rng: ImageEnhance.Sharpness(img).enhance(v), 0.1, 1.9),
    ("ShearX", lambda img, v, rng: _affine(img, (1, _random_sign(v, rng), 0, 0, 1, 0)), 0.0, 0.3),
    ("ShearY", lambda img, v, rng: _affine(img, (1, 0, 0, _random_sign(v, rng), 1, 0)), 0.0, 0.3),
    ("TranslateXabs", lambda img, v, rng: _affine(img, (1, 0, _random_sign(v, rng), 0, 1, 0)), 0.0, 100),
    ("TranslateYabs", lambda img, v, rng: _affine(img, (1, 0, 0, 0, 1, _random_sign(v, rng))), 0.0, 100),
)


class ViltRandAugment:
    """ViLT's RandAugment(n, m) on a PIL image: `n` ops drawn with replacement (`rng.choices`) from
    `VILT_RANDAUG_OPS`, each at value m / 30 x (max - min) + min. At ViLT's (2, 9): rotate +-9 degrees, shear +-0.09,
    translate +-30 pixels (absolute, on the image before its resize), posterize to 1 bit, solarize above 76.8,
    solarize-add 33, colour/contrast/brightness/sharpness factor 0.64.

    torchvision's RandAugment is not the same augmentation (it adds Identity, lacks SolarizeAdd, translates by a
    fraction of the size, and at magnitude 9 posterizes to 7 bits, solarizes above 178.5 and draws enhance factors
    1 +- 0.27), so ViLT's ops are written out here. Randomness comes only from `rng` (a `random.Random`): the same
    seed gives the same image. Picklable."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9):
        if num_ops < 0 or not 0 <= magnitude <= 30:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude <= 30, got {num_ops}, {magnitude}")
        self.num_ops, self.magnitude = num_ops, magnitude

    def value(self, low: float, high: float) -> float:
        return self.magnitude / 30 * float(high - low) + low

    def __call__(self, image: Image.Image, rng) -> Image.Image:
        for _, operation, low, high in rng.choices(VILT_RANDAUG_OPS, k=self.num_ops):
            image = operation(image, self.value(low, high), rng)
        return image

    def __repr__(self) -> str:
        return f"vilt_randaugment({self.num_ops}, {self.magnitude})"
