"""The batch contract every loader yields and every method reads: ``(x, y, a)`` (extra items, such as the sample
keys, may follow): x float32 [B, 3, H, W], y float32 [B] in {0, 1}, a int64 [B] the sensitive attribute's group.

:func:`attr_code` turns an attribute value of the metadata into its integer group; :func:`unpack_batch` moves a
batch's (x, y, a) to the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def unpack_batch(batch: Sequence, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, a) on ``device`` from a batch whose first three items are x, y and a (extra items are ignored)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 3:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise ValueError(f"a batch must be a tuple (x, y, a, ...); got a {kind}{size}")
    x, y, a = batch[0], batch[1], batch[2]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), a.to(device, non_blocking=True)


def attr_code(value: Any, attr: str, attr_map: Mapping[Any, int] | None, where: str) -> int:
    """The integer group of an attribute value: ``attr_map[value]``, or the value itself when it is integral."""
    if attr_map is not None:
        if value in attr_map:
            return int(attr_map[value])
        if isinstance(value, str) or str(value) not in attr_map:
            raise ValueError(
                f"{where}: attribute {attr!r} value {value!r} is not in attr_map (known: {sorted(map(str, attr_map))})"
            )
        return int(attr_map[str(value)])
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{where}: attribute {attr!r} value {value!r} is not an integer group; pass attr_map")
