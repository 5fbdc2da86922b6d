"""The external set's split into fitting and validation parts (fastmask.data.splits): stratified by (group, label),
seeded, disjoint and complete, every cell in both parts; a cell too small to split is an error naming it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmask.data.splits import stratified_split


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(2, 40), min_size=4, max_size=4), fraction=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**16))
def test_each_cell_splits_by_the_fraction(counts, fraction, seed):
    cells = [(g, c) for g in (0, 1) for c in (0, 1)]
    a = np.repeat([g for g, _ in cells], counts)
    y = np.repeat([c for _, c in cells], counts)
    order = np.random.default_rng(seed).permutation(len(y))
    y, a = y[order], a[order]
    fit, val = stratified_split(y, a, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(y)))  # disjoint and complete
    for (g, c), n in zip(cells, counts, strict=True):
        in_val = int(((a[val] == g) & (y[val] == c)).sum())
        assert in_val == min(n - 1, max(1, round(fraction * n)))
        assert 1 <= in_val <= n - 1
    again = stratified_split(y, a, fraction, seed)
    assert np.array_equal(again[1], val)  # seeded


def test_a_cell_too_small_to_split_is_named():
    y = np.array([0, 0, 1, 1, 0, 1, 1])
    a = np.array([0, 0, 0, 0, 1, 1, 1])  # (group 1, label 0) holds one sample
    with pytest.raises(ValueError, match="the cell group 1, label 0 holds 1 sample"):
        stratified_split(y, a)
    with pytest.raises(ValueError, match=r"validation fraction must be in \(0, 1\)"):
        stratified_split(y, a, 1.0)
