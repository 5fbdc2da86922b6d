"""The preprocessing of ``fastmask debias``, ``evaluate`` and ``compare`` (docs/cli.md, "Preprocessing"): every
setting from its command-line flag when given, else from the model's own configuration
(:func:`fastmask.model.weights.input_config`: timm's ``pretrained_cfg``), else fastmask's default (the papers':
resize to 256, ImageNet mean and std, all three flips). The record of what was used and where each setting came
from goes into report.json and metrics.json, so that a run's preprocessing is never a guess; a size other than the
one the model's configuration expects is warned about, since a model fed images of another scale may predict one
class for everyone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from fastmask.data.transforms import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from fastmask.model.weights import input_config

__all__ = ["DEFAULT_IMAGE_SIZE", "Resolved", "resolve_preprocessing"]

log = logging.getLogger("fastmask.app")

#: The resize when neither a flag nor the model's configuration gives one (the papers' skin recipe).
DEFAULT_IMAGE_SIZE = 256


@dataclass(frozen=True)
class Resolved:
    """The preprocessing decided for a model, and its record for the reports: the settings, ``sources`` (per
    setting ``"flag"``, ``"model config"`` or ``"default"``), the model's configuration as read (None without one)
    and the warnings."""

    preprocessing: Preprocessing
    sources: dict[str, str]
    model_config: dict[str, Any] | None
    warnings: list[str]

    def record(self) -> dict[str, Any]:
        """What report.json / metrics.json hold under ``preprocessing``."""
        return {**asdict(self.preprocessing), "input_size": self.preprocessing.input_size, "interpolation": "bilinear",
                "sources": self.sources, "model_config": self.model_config, "warnings": self.warnings}


def resolve_preprocessing(model: nn.Module, *, image_size: int | None = None, crop: int | None = None,
                          center_crop: int | None = None, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None,
                          augment: Sequence[str] | None = None) -> Resolved:
    """Every preprocessing setting for ``model``: the value given (not None), else its configuration's, else the
    default.

    - size: ``image_size`` / ``crop`` as given; when neither is, the configuration's input size S (with its
      ``crop_pct`` p < 1: a resize to floor(S / p) and a centre crop of S, as timm evaluates), else a resize to
      :data:`DEFAULT_IMAGE_SIZE` without a crop.
    - ``mean`` and ``std``: given together, or each the configuration's, else ImageNet's.
    - ``augment``: the training augmentations (default: all of :data:`~fastmask.data.transforms.AUGMENTATIONS`).

    When the configuration states an input size and the model would see another, the warning (logged, and kept in
    :attr:`Resolved.warnings`) names both.
    """
    if (mean is None) != (std is None):
        raise ValueError("--mean and --std go together: give both (or --normalize)")
    config = input_config(model)
    cfg = config or {}
    sources = {"image_size": "flag", "crop": "flag", "center_crop": "flag" if center_crop is not None else "default",
               "mean": "flag", "std": "flag", "augment": "flag" if augment is not None else "default"}
    if image_size is None and crop is None and "size" in cfg:
        pct = cfg.get("crop_pct", 1.0)
        # floor, as timm; the 1e-6 keeps an exact ratio (torchvision's 224 / 232) from falling one pixel short
        image_size, crop = (math.floor(cfg["size"] / pct + 1e-6), cfg["size"]) if pct < 1 else (cfg["size"], None)
        sources["image_size"] = "model config"
        sources["crop"] = "model config" if crop is not None else "default"
    else:
        if image_size is None:
            image_size, sources["image_size"] = DEFAULT_IMAGE_SIZE, "default"
        if crop is None:
            sources["crop"] = "default"
    if mean is None:
        for name in ("mean", "std"):
            sources[name] = "model config" if name in cfg else "default"
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    prep = Preprocessing(image_size=image_size, crop=crop, center_crop=center_crop, mean=tuple(mean),
                         std=tuple(std), augment=tuple(AUGMENTATIONS if augment is None else augment))
    warnings = []
    if "size" in cfg and prep.input_size != cfg["size"]:
        given = f"--crop {crop}" if crop is not None else f"--image-size {image_size}"
        warnings.append(f"{given}: the model sees {prep.input_size} px images, but its configuration "
                        f"({cfg['attribute']} input_size) expects {cfg['size']} px")
    for message in warnings:
        log.warning("%s", message)
    return Resolved(prep, sources, config, warnings)
