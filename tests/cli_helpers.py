"""Helpers of the CLI tests: a tiny CNN named as ``cli_helpers:TinyCNN`` on the command line, and a small image
data set with a tint attribute (PNG files + a metadata CSV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn


class TinyCNN(nn.Module):
    """f = C∘E with BatchNorm in E and dropout in the head C, so that resuming depends on the BN statistics, the
    optimizer state and the RNG (dropout) all being restored."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_weights(path: Path, seed: int = 0) -> nn.Module:
    """A seeded TinyCNN saved as a plain state dict with torch.save; returns the model."""
    torch.manual_seed(seed)
    model = TinyCNN()
    torch.save(model.state_dict(), path)
    return model


def make_dataset(root: Path, n: int = 64, n_test: int = 24, size: int = 12, seed: int = 0) -> pd.DataFrame:
    """``n`` PNG images under ``root/images`` and their table: label y (a bright square in the image or not), a
    tint attribute ``tint`` in {0, 1} correlated with y, a text attribute ``sex`` (F / M) and a fold
    (``test`` for the last ``n_test`` rows, ``ext`` before). Written to ``root/meta.csv``; returned."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        y = i % 2
        tint = y if rng.random() < 0.75 else 1 - y
        arr = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        if y:
            arr[3:9, 3:9] = 220
        arr[..., 2 if tint else 0] = np.clip(arr[..., 2 if tint else 0].astype(int) + 60, 0, 255)
        name = f"img{i:03d}.png"
        Image.fromarray(arr).save(images / name)
        rows.append({"filepath": name, "target": y, "tint": tint, "sex": "F" if (i // 2) % 2 else "M",
                     "fold": "test" if i >= n - n_test else "ext"})
    table = pd.DataFrame(rows)
    table.to_csv(root / "meta.csv", index=False)
    return table


#: The preprocessing ``configured_cnn`` states: 12 px seen, cropped from a 16 px resize (crop_pct 0.75), its mean / std.
CONFIG = {"input_size": (3, 12, 12), "crop_pct": 0.75, "mean": (0.4, 0.5, 0.6), "std": (0.3, 0.2, 0.25)}


def configured_cnn() -> TinyCNN:
    """A TinyCNN that states its preprocessing as timm's models do (``pretrained_cfg``)."""
    model = TinyCNN()
    model.pretrained_cfg = dict(CONFIG)
    return model
