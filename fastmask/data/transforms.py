"""The papers' image transforms (docs/algorithm.md §1 Transforms), with PIL and torch only.

The authors' code uses albumentations; this module reproduces the same operations:

- training (skin): Resize(s, s) -> HorizontalFlip(p) -> VerticalFlip(p) -> Transpose(p) -> Normalize
- test: Resize(s, s) -> Normalize, optionally after a centre crop of the original image (the CXR recipe crops
  first, then resizes)

``Normalize`` is albumentations' default: x = (u8 / 255 - mean) / std with the ImageNet mean and std, per channel.
Each step is a setting of :class:`Preprocessing` (the command line's preprocessing options): the size, a centre
crop of the original (``center_crop``) or of the resized image (``crop``: resize-then-crop, as timm and torchvision
evaluate), the mean and std (:data:`NORMALIZATIONS`), and which of the three augmentations run.

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

__all__ = ["AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "ImageTransform", "Preprocessing",
           "augment", "decode_image", "normalize_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The normalisations by name: ``none`` leaves the pixels in [0, 1] (x = u8 / 255).
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
#: The training augmentations, in the order they are applied; the papers run all three, each with probability 0.5.
AUGMENTATIONS = ("hflip", "vflip", "transpose")


def decode_image(src: bytes | str | os.PathLike, image_size: int, center_crop: int | None = None,
                 crop: int | None = None) -> np.ndarray:
    """Decode an image (bytes or a file path) to RGB uint8 [S, S, 3], S = ``crop`` if given, else ``image_size``.

    Optional centre crop of ``center_crop`` pixels (clipped to the image) on the original image, then a bilinear
    resize to ``image_size`` x ``image_size`` (albumentations' Resize default is bilinear), then an optional centre
    crop of ``crop`` pixels of the resized image. Grey images are replicated to three channels. JPEGs are decoded at
    the smallest DCT scale that is still at least the target size (PIL ``draft``), which is where most of the
    decode time of large photographs goes.
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
    if crop is not None and crop < image_size:
        left = (image_size - crop) // 2
        rgb = rgb.crop((left, left, left + crop, left + crop))
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
        image_size: height and width of the resize (square, as in the papers: 256 for skin, 224 for CXR).
        train: apply the random augmentations.
        center_crop: crop this many pixels around the centre of the original image before resizing.
        crop: crop this many pixels around the centre of the resized image (the output size; at most
            ``image_size``).
        hflip, vflip, transpose: probabilities of each augmentation (0.5 in the papers).
        mean, std: per-channel normalisation (ImageNet by default).
    """

    image_size: int
    train: bool = False
    center_crop: int | None = None
    crop: int | None = None
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
        if self.crop is not None and not 1 <= self.crop <= self.image_size:
            raise ValueError(f"crop must be a positive int at most the resize, {self.image_size} px (the centre crop "
                             f"is taken from the resized image), got {self.crop!r}")
        for name in ("hflip", "vflip", "transpose"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {p}")

    @property
    def output_size(self) -> int:
        """The height and width of the images this transform makes (the crop, else the resize)."""
        return self.crop if self.crop is not None else self.image_size

    def image(self, src: bytes | str | os.PathLike, rng: np.random.Generator | None = None) -> np.ndarray:
        """One image as uint8 HWC after decode, crop, resize and (when training) augmentation."""
        img = decode_image(src, self.image_size, self.center_crop, self.crop)
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


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing of a run, every setting decided: what :class:`ImageTransform` each loader gets.

    Args:
        image_size: the square the images are resized to (the papers: 256 skin, 224 CXR).
        crop: the centre crop of the resized image, the size the model sees (None: the whole resized image).
        center_crop: the centre crop of the original image before the resize (the CXR recipe).
        mean, std: the per-channel normalisation x = (u8 / 255 - mean) / std (:data:`NORMALIZATIONS`).
        augment: the training augmentations that run, each with probability 0.5 (a subset of
            :data:`AUGMENTATIONS`; the papers': all three).
    """

    image_size: int = 256
    crop: int | None = None
    center_crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: tuple[str, ...] = AUGMENTATIONS

    def __post_init__(self) -> None:
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"augment {unknown[0]!r} is not one of {AUGMENTATIONS}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values (R G B), got {getattr(self, name)!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        self.transform(train=False)  # the size settings checked once, here

    @property
    def input_size(self) -> int:
        """The height and width of what the model sees."""
        return self.crop if self.crop is not None else self.image_size

    def transform(self, train: bool) -> ImageTransform:
        """The transform of a loader: with the chosen augmentations when ``train``."""
        flips = {name: 0.5 if name in self.augment else 0.0 for name in AUGMENTATIONS}
        return ImageTransform(self.image_size, train=train, center_crop=self.center_crop, crop=self.crop,
                              mean=self.mean, std=self.std, **flips)
