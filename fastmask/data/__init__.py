"""fastmask's data layer: WebDataset shards from a metadata table, the streaming loader, the papers' transforms.

Every loader yields the project's batch contract ``(x, y, a)``: x float32 [B, 3, H, W] (ImageNet-normalised),
y float32 [B] in {0, 1}, a int64 [B].
"""

from .loader import ImageTableDataset, LoaderStats, ShardLoader, ShardReadError, SkipRecord, attr_code, make_loader
from .shards import ShardIndex, ShardInfo, atomic_write_bytes, check_table, read_table, sample_keys, write_shards
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, augment, decode_image, normalize_batch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTableDataset",
    "ImageTransform",
    "LoaderStats",
    "ShardIndex",
    "ShardInfo",
    "ShardLoader",
    "ShardReadError",
    "SkipRecord",
    "atomic_write_bytes",
    "attr_code",
    "augment",
    "check_table",
    "decode_image",
    "make_loader",
    "normalize_batch",
    "read_table",
    "sample_keys",
    "write_shards",
]
