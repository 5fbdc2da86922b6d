"""The papers' image transforms (docs/algorithm.md §1 Transforms), with PIL and torch only.

The authors' code uses albumentations; this module reproduces the same operations:

- training (skin): Resize(s, s) -> HorizontalFlip(p) -> VerticalFlip(p) -> Transpose(p) -> Normalize
- test: Resize(s, s) -> Normalize, optionally after a centre crop of the original image (the CXR recipe crops
  first, then resizes)

``Normalize`` is albumentations' default: x = (u8 / 255 - mean) / std with the ImageNet mean and std, per channel.

Decoding yields uint8 HWC arrays; flips and the transpose are numpy views; a whole batch is stacked and
normalised at once (one float pass over the batch instead of one per image).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "augment", "decode_image", "normalize_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(src: bytes | str | os.PathLike, image_size: int, center_crop: int | None = None) -> np.ndarray:
    """Decode an image (bytes or a file path) to RGB uint8 [image_size, image_size, 3].

    Optional centre crop of ``center_crop`` pixels (clipped to the image) on the original image, then a bilinear
    resize to ``image_size`` x ``image_size`` (albumentations' Resize default is bilinear). Grey images are
    replicated to three channels. JPEGs are decoded at the smallest DCT scale that is still at least the target
    size (PIL ``draft``), which is where most of the decode time of large photographs goes.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as img:
        if center_crop is None:
            # draft() only ever shrinks by powers of two and never below the requested size.
            img.draft("RGB", (image_size, image_size))
        rgb = img.convert("RGB")
    if center_crop is not None:
        w, h = rgb.size
        cw, ch = min(center_crop, w), min(center_crop, h)
        left, top = (w - cw) // 2, (h - ch) // 2
        rgb = rgb.crop((left, top, left + cw, top + ch))
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb)


def augment(
    img: np.ndarray, rng: np.random.Generator, hflip: float = 0.5, vflip: float = 0.5, transpose: float = 0.5
) -> np.ndarray:
    """Random horizontal flip, vertical flip and transpose (rows <-> columns), each with its own probability,
    in albumentations' order. Returns a view; three uniform draws per call whatever the probabilities, so the
    random stream does not depend on them."""
    u = rng.random(3)
    if u[0] < hflip:
        img = img[:, ::-1]
    if u[1] < vflip:
        img = img[::-1]
    if u[2] < transpose:
        img = img.transpose(1, 0, 2)
    return img


def normalize_batch(
    images: Sequence[np.ndarray],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    shared: bool = False,
) -> torch.Tensor:
    """Stack uint8 HWC images into a contiguous float32 [B, 3, H, W] batch with x = (u8 / 255 - mean) / std.

    ``shared=True`` allocates the batch in shared memory, as ``default_collate`` does inside DataLoader workers:
    handing it to the main process is then free instead of a copy of the whole batch.
    """
    u8 = torch.from_numpy(np.stack(images))  # np.stack makes flipped / transposed views contiguous
    n, h, w, _ = u8.shape
    if shared:
        storage = torch.UntypedStorage._new_shared(n * 3 * h * w * 4)
        x = torch.empty(0, dtype=torch.float32).set_(storage).view(n, 3, h, w)
    else:
        x = torch.empty((n, 3, h, w), dtype=torch.float32)
    x.copy_(u8.permute(0, 3, 1, 2))
    # (u / 255 - m) / s == u * (1 / (255 s)) - m / s: two in-place passes instead of three.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


@dataclass(frozen=True)
class ImageTransform:
    """The papers' transform for one image: decode + (centre crop) + resize, then, when ``train``, the random
    flips and transpose; :meth:`batch` stacks and normalises.

    Args:
        image_size: output height and width (square, as in the papers: 256 for skin, 224 for CXR).
        train: apply the random augmentations.
        center_crop: crop this many pixels around the centre of the original image before resizing.
        hflip, vflip, transpose: probabilities of each augmentation (0.5 in the papers).
        mean, std: per-channel normalisation (ImageNet by default).
    """

    image_size: int
    train: bool = False
    center_crop: int | None = None
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.center_crop is not None and self.center_crop < 1:
            raise ValueError(f"center_crop must be a positive int or None, got {self.center_crop!r}")
        for name in ("hflip", "vflip", "transpose"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {p}")

    def image(self, src: bytes | str | os.PathLike, rng: np.random.Generator | None = None) -> np.ndarray:
        """One image as uint8 HWC after decode, crop, resize and (when training) augmentation."""
        img = decode_image(src, self.image_size, self.center_crop)
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs rng (a numpy Generator) for its random flips")
            img = augment(img, rng, self.hflip, self.vflip, self.transpose)
        return img

    def batch(self, images: Sequence[np.ndarray], *, shared: bool = False) -> torch.Tensor:
        """Stack and normalise images from :meth:`image` into float32 [B, 3, H, W] (in shared memory if asked)."""
        return normalize_batch(images, self.mean, self.std, shared=shared)

    def __call__(self, src: bytes | str | os.PathLike, rng: np.random.Generator | None = None) -> torch.Tensor:
        """One image as a normalised float32 [3, H, W] tensor."""
        return self.batch([self.image(src, rng)])[0]
