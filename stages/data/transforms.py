"""Image transforms matching ViLT's `pixelbert_transform` (MinMaxResize + ToTensor + normalise mean/std 0.5)."""
from __future__ import annotations

from PIL import Image


def min_max_size(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """ViLT's MinMaxResize target (width, height): shorter side -> size, longer <= max_size, multiples of 32."""
    scale = size / min(width, height)
    new_w, new_h = width * scale, height * scale
    if max(new_w, new_h) > max_size:
        shrink = max_size / max(new_w, new_h)
        new_w, new_h = new_w * shrink, new_h * shrink
    new_w, new_h = int(new_w + 0.5) // 32 * 32, int(new_h + 0.5) // 32 * 32
    return max(new_w, 32), max(new_h, 32)  # never collapse a very elongated image to zero


class PixelBertTransform:
    """PIL image -> FloatTensor[3, H, W] in [-1, 1], H and W multiples of 32 (bicubic resize). Picklable."""

    def __init__(self, size: int = 384, max_size: int = 640):
        if size < 32 or max_size < size:
            raise ValueError(f"pixelbert_transform: need 32 <= size <= max_size, got size={size}, max_size={max_size}")
        self.size, self.max_size = size, max_size

    def __call__(self, image: Image.Image):
        from torchvision.transforms import functional as F

        image = image.convert("RGB")
        target = min_max_size(image.width, image.height, self.size, self.max_size)
        tensor = F.to_tensor(image.resize(target, resample=Image.BICUBIC))
        return F.normalize(tensor, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])

    def __repr__(self) -> str:
        return f"pixelbert_transform(size={self.size}, max_size={self.max_size})"


def pixelbert_transform(size: int = 384, max_size: int = 640) -> PixelBertTransform:
    """ViLT's default image transform (size 384, longer side <= 640 as in ViLT's 1333/800 * 384)."""
    return PixelBertTransform(size, max_size)
