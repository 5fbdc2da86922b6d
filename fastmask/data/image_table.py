"""A map-style dataset over a metadata table and its image files: the same ``(x, y, a)`` items as the streaming
loader's batches, for users without shards and for the benchmarks' per-file ``reference`` loader."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastmask.data.batch import attr_code
from fastmask.data.table import check_table, read_table, sample_keys
from fastmask.data.transforms import ImageTransform


class ImageTableDataset(torch.utils.data.Dataset):
    """Map-style dataset over a metadata table, one image file read per item, returning the same triple
    ``(x [3, H, W], y, a)`` as the streaming loader's batches (``default_collate`` stacks them).

    For users without shards, and the loader benchmark's reference provider (the papers' one-file-per-image
    loader). Augmentation draws are seeded per item by (seed, epoch, position), so they do not depend on the worker
    that loads the item; ``set_epoch`` changes them.

    Args:
        table: DataFrame (or CSV / parquet path) with image path, label and attribute columns.
        image_root: directory that relative image paths are resolved against.
        image_size, train, center_crop, transform: as for :func:`make_loader`.
        attr: the attribute column that becomes ``a``; attr_map: value -> int group.
        image_col, label_col: column names.
        key_col: column of sample keys (default: row position, as :func:`write_shards` names them).
        seed: augmentation seed.
        return_keys: items are ``(x, y, a, key)``.
    """

    def __init__(
        self,
        table: pd.DataFrame | str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        image_size: int,
        attr: str,
        train: bool = False,
        attr_map: Mapping[Any, int] | None = None,
        image_col: str = "filepath",
        label_col: str = "target",
        key_col: str | None = None,
        center_crop: int | None = None,
        transform: ImageTransform | None = None,
        seed: int = 0,
        return_keys: bool = False,
    ) -> None:
        if not isinstance(table, pd.DataFrame):
            table = read_table(table)
        records = check_table(table, image_col=image_col, label_col=label_col, attr_cols=[attr])
        root = Path(image_root)
        self.paths = [root / r["path"] for r in records]
        self.labels = [float(r["label"]) for r in records]
        self.attrs = [attr_code(r["attrs"][attr], attr, attr_map, f"column {attr!r} row {i}")
                      for i, r in enumerate(records)]
        self.keys = sample_keys(table, key_col)
        self.transform = transform or ImageTransform(image_size, train=train, center_crop=center_crop)
        self.seed = seed
        self.epoch = 0
        self.return_keys = return_keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple:
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.transform.train else None
        try:
            x = self.transform(self.paths[i], rng)
        except FileNotFoundError:
            raise FileNotFoundError(f"row {i}: image file not found: {self.paths[i]}") from None
        except Exception as err:  # PIL raises many types on bad bytes
            raise ValueError(f"row {i}: unreadable image {self.paths[i]}: {type(err).__name__}: {err}") from err
        y = torch.tensor(self.labels[i], dtype=torch.float32)
        a = torch.tensor(self.attrs[i], dtype=torch.int64)
        return (x, y, a, self.keys[i]) if self.return_keys else (x, y, a)
