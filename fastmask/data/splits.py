"""The external set split into a fitting part and a validation part, stratified by (group, label) and seeded: the
fitting part builds the mask and trains, the validation part chooses among configurations and epochs
(:mod:`fastmask.methods.selection`), so no choice is made on the data it is judged on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(y: Sequence[int], a: Sequence[int], fraction: float = 0.25,
                     seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) positions into ``y`` / ``a``: from every (group, label) cell, ``round(fraction · n)`` of its
    n samples (at least 1, at most n − 1) go to validation, drawn with ``np.random.default_rng(seed)``; the rest fit.
    Both parts therefore hold every cell, so validation AUC and the group gaps are defined.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or a cell with fewer than 2 samples (it cannot be in both parts);
            the message names the cell and its count.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    y, a = np.asarray(y), np.asarray(a)
    if y.shape != a.shape or y.ndim != 1:
        raise ValueError(f"y and a must be 1-D and of one length, got shapes {y.shape} and {a.shape}")
    rng = np.random.default_rng(seed)
    val = []
    for g in np.unique(a):
        for c in np.unique(y):
            cell = np.flatnonzero((a == g) & (y == c))
            if len(cell) == 0:
                continue
            if len(cell) < 2:
                raise ValueError(f"the cell group {g}, label {c} holds {len(cell)} sample: too few to split into a "
                                 "fitting and a validation part (each needs one); add data or choose one fixed "
                                 "configuration (--select none)")
            k = min(len(cell) - 1, max(1, round(fraction * len(cell))))
            val.append(rng.choice(cell, size=k, replace=False))
    val_idx = np.sort(np.concatenate(val))
    fit_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return fit_idx, val_idx
