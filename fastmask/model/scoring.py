"""Scoring a model on a loader: the one function that turns (model, loader) into labels, probabilities and groups,
used by the collapse guard, the baselines' model selection, ``fastmask debias``, ``evaluate``, ``compare`` and the
demo alike, so every number fastmask reports is computed in one precision.

p = σ(z) is computed in float64 from the model's logits (of any dtype): a float32 sigmoid rounds every |z| < 3e-8 to
exactly 0.5, which the threshold p > 0.5 would then call negative while z > 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fastmask.data.batch import unpack_batch
from fastmask.util.profiling import phase, ranged


class Scores(NamedTuple):
    """One pass of a model over a loader: ``y`` int64 labels, ``p`` = σ(z) float64, ``a`` int64 groups, and the
    samples' ``keys`` when the loader yields them (``(x, y, a, keys)`` batches), else an empty list."""

    y: np.ndarray
    p: np.ndarray
    a: np.ndarray
    keys: list[str]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter; a model without parameters is an error naming its class."""
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no parameters")
    return p.device


@torch.no_grad()
@phase("fastmask.evaluate")
def score(model: nn.Module, loader: Iterable, device: torch.device | str | None = None, *, progress: bool = False,
          desc: str = "evaluate") -> Scores:
    """:class:`Scores` over one pass of ``loader`` with ``model`` in eval mode (its mode is restored), on ``device``
    (default: the model's)."""
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    ys, ps, groups, keys = [], [], [], []
    try:
        for batch in ranged(tqdm(loader, desc=desc, disable=not progress, leave=False)):
            x, y, a = unpack_batch(batch, device)
            ps.append(torch.sigmoid(model(x).reshape(-1).double()).cpu())
            ys.append(y.reshape(-1).cpu())
            groups.append(a.reshape(-1).cpu())
            if len(batch) > 3:
                keys.extend(batch[3])
    finally:
        model.train(was_training)
    if not ps:
        raise ValueError(f"{desc}: the loader yielded no samples")
    return Scores(torch.cat(ys).numpy().astype(np.int64), torch.cat(ps).numpy(),
                  torch.cat(groups).numpy().astype(np.int64), keys)
