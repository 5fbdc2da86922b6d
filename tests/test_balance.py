"""Tests of fastmask.data.balance (docs/algorithm.md §1, §8.4, §8.17): counts, determinism, errors and a hand-made
reduction."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fastmask.data.balance import extreme_groups, group_balance
from fastmask.fairness.metrics import auc_by_group


def _frame(counts: dict[tuple[int, int], int], extra_attr_values=()) -> pd.DataFrame:
    """A D_e with ``counts[(a, y)]`` rows per cell, string keys and a shuffled, non-default index."""
    rows = [(a, y) for (a, y), n in counts.items() for _ in range(n)]
    rows += [(v, 0) for v in extra_attr_values]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    df = pd.DataFrame(
        {
            "filepath": [f"img_{i}.jpg" for i in order],
            "gender": [rows[i][0] for i in order],
            "target": [rows[i][1] for i in order],
        },
        index=pd.Index(1000 + order, name="key"),
    )
    return df


def _cell_counts(df: pd.DataFrame, attr: str = "gender") -> dict[tuple[int, int], int]:
    return {(a, y): int(((df[attr] == a) & (df["target"] == y)).sum()) for a in (0, 1) for y in (0, 1)}


COUNTS = {(0, 0): 40, (0, 1): 12, (1, 0): 9, (1, 1): 5}  # G0 = 52 rows (L), G1 = 14 rows (S)


@pytest.mark.parametrize("replace", ["auto", True, False])
def test_equal_per_label_counts_and_small_group_kept(replace):
    df = _frame(COUNTS)
    out = group_balance(df, "gender", seed=3, replace=replace)
    assert _cell_counts(out) == {(0, 0): 9, (0, 1): 5, (1, 0): 9, (1, 1): 5}
    assert len(out) == 2 * 14
    assert list(out.index) == list(range(len(out)))
    # S (gender = 1) is kept entirely and exactly; it comes last.
    s_rows = df[df["gender"] == 1]
    tail = out.iloc[-len(s_rows) :]
    assert list(tail["source_index"]) == list(s_rows.index)
    pd.testing.assert_frame_equal(
        tail.drop(columns="source_index").reset_index(drop=True), s_rows.reset_index(drop=True)
    )
    # L-sample order: label 0 first, then label 1.
    head = out.iloc[: -len(s_rows)]
    assert (head["gender"] == 0).all() and list(head["target"]) == [0] * 9 + [1] * 5
    # every row maps back to its source row
    for _, row in out.iterrows():
        src = df.loc[row["source_index"]]
        assert (src["filepath"], src["gender"], src["target"]) == (row["filepath"], row["gender"], row["target"])
    assert out.attrs["larger_group"] == 0 and out.attrs["dropped_rows"] == 0


def test_without_replacement_has_no_duplicates():
    df = _frame(COUNTS)
    for replace in ("auto", False):
        for seed in range(5):
            out = group_balance(df, "gender", seed=seed, replace=replace)
            assert out["source_index"].is_unique
            assert out.attrs["replace"] == {0: False, 1: False}


def test_with_replacement_is_uniform_draws():
    # S = G0 has 200 negatives, L = G1 has 1002: 200 uniform draws with replacement from 1002 rows duplicate some
    # row with probability 1 - prod_{i<200}(1 - i/1002) > 1 - 1e-8.
    df = _frame({(0, 0): 200, (1, 0): 1002})
    out = group_balance(df, "gender", seed=0, replace=True)
    l_part = out.iloc[:200]
    assert (l_part["gender"] == 1).all()
    assert not l_part["source_index"].is_unique
    assert out.attrs["replace"] == {0: True, 1: True}


def test_auto_falls_back_to_replacement_per_label():
    # L (gender=1, 30 rows) has 25 negatives and only 5 positives; S (gender=0, 20 rows) has 12 / 8.
    df = _frame({(0, 0): 12, (0, 1): 8, (1, 0): 25, (1, 1): 5})
    out = group_balance(df, "gender", seed=1)
    assert out.attrs["larger_group"] == 1 and out.attrs["replace"] == {0: False, 1: True}
    assert _cell_counts(out) == {(0, 0): 12, (0, 1): 8, (1, 0): 12, (1, 1): 8}
    neg = out[(out["gender"] == 1) & (out["target"] == 0)]
    assert neg["source_index"].is_unique
    with pytest.raises(ValueError, match=r"has 5 rows with target=1, fewer than the 8"):
        group_balance(df, "gender", replace=False)


def test_tie_makes_group_one_larger():
    out = group_balance(_frame({(0, 0): 3, (0, 1): 2, (1, 0): 4, (1, 1): 1}), "gender", seed=0)
    assert out.attrs["larger_group"] == 1
    # S = G0 kept: 3 negatives, 2 positives drawn from G1 (only 1 positive there -> with replacement)
    assert _cell_counts(out) == {(0, 0): 3, (0, 1): 2, (1, 0): 3, (1, 1): 2}


@pytest.mark.parametrize("replace", ["auto", True, False])
def test_deterministic_per_seed(replace):
    df = _frame(COUNTS)
    a = group_balance(df, "gender", seed=7, replace=replace)
    b = group_balance(df, "gender", seed=7, replace=replace)
    pd.testing.assert_frame_equal(a, b)
    others = [group_balance(df, "gender", seed=s, replace=replace)["source_index"].tolist() for s in range(8, 12)]
    assert any(o != a["source_index"].tolist() for o in others)


def test_input_untouched_and_custom_index_column():
    df = _frame(COUNTS)
    before = df.copy()
    out = group_balance(df, "gender", index_column="row_key")
    pd.testing.assert_frame_equal(df, before)
    assert "row_key" in out.columns and "source_index" not in out.columns


def test_non_binary_attribute_rows_dropped_and_counted(caplog):
    df = _frame(COUNTS, extra_attr_values=[2, 2, -1, np.nan])
    with caplog.at_level(logging.WARNING, logger="fastmask.data.balance"):
        out = group_balance(df, "gender", seed=0)
    assert out.attrs["dropped_rows"] == 4
    assert "dropped 4 of 70 rows" in caplog.text and "'gender'" in caplog.text
    assert set(out["gender"].unique()) == {0, 1}
    assert _cell_counts(out) == {(0, 0): 9, (0, 1): 5, (1, 0): 9, (1, 1): 5}


def test_errors():
    df = _frame(COUNTS)
    with pytest.raises(ValueError, match=r"attribute column 'age' is not in the DataFrame"):
        group_balance(df, "age")
    with pytest.raises(ValueError, match=r"target column 'label' is not in the DataFrame"):
        group_balance(df, "gender", target="label")
    with pytest.raises(ValueError, match="replace must be"):
        group_balance(df, "gender", replace="yes")
    with pytest.raises(ValueError, match="replace must be"):
        group_balance(df, "gender", replace=1)
    with pytest.raises(ValueError, match="'source_index' already exists"):
        group_balance(df.assign(source_index=0), "gender")
    # L (gender=0) has no positives while S (gender=1) has 3
    no_pos = _frame({(0, 0): 20, (1, 0): 5, (1, 1): 3})
    with pytest.raises(ValueError, match=r"attribute 'gender'.*no rows with target=1.*smaller group has 3"):
        group_balance(no_pos, "gender")
    with pytest.raises(ValueError, match="'gender' has no rows with value 1"):
        group_balance(_frame({(0, 0): 5, (0, 1): 5}), "gender")
    bad_y = df.copy()
    bad_y.iloc[0, bad_y.columns.get_loc("target")] = 2
    with pytest.raises(ValueError, match=r"target column 'target' must hold only 0 and 1; found \[2\]"):
        group_balance(bad_y, "gender")
    with pytest.raises(TypeError, match="DataFrame"):
        group_balance(df.to_dict(), "gender")


@settings(max_examples=40, deadline=None)
@given(
    n=st.tuples(*[st.integers(0, 15)] * 4),
    seed=st.integers(0, 2**32 - 1),
    replace=st.sampled_from(["auto", True]),
)
def test_balance_property(n, seed, replace):
    counts = dict(zip([(0, 0), (0, 1), (1, 0), (1, 1)], n, strict=True))
    g0, g1 = n[0] + n[1], n[2] + n[3]
    df = _frame(counts)
    small, large = (1, 0) if g0 > g1 else (0, 1)
    expected_error = g0 == 0 or g1 == 0 or any(counts[(small, c)] > 0 and counts[(large, c)] == 0 for c in (0, 1))
    if expected_error:
        with pytest.raises(ValueError):
            group_balance(df, "gender", seed=seed, replace=replace)
        return
    out = group_balance(df, "gender", seed=seed, replace=replace)
    got = _cell_counts(out)
    for c in (0, 1):
        assert got[(0, c)] == got[(1, c)] == counts[(small, c)]
    assert len(out) == 2 * min(g0, g1)
    assert out["source_index"].iloc[-min(g0, g1) :].tolist() == df.index[df["gender"] == small].tolist()


def test_extreme_groups_hand_example():
    # Fitzpatrick-like groups 1..4 with AUCs 0.80, 0.95, 0.70, 0.95: g_max = 2 (tie with 4, smaller id),
    # g_min = 3. Rows of groups 2 and 3 are kept; 3 -> a = 1, 2 -> a = 0.
    df = pd.DataFrame(
        {"skin": [1, 2, 3, 4, 2, 3, 3, 1], "target": [0, 1, 0, 1, 0, 1, 1, 0]},
        index=[10, 11, 12, 13, 14, 15, 16, 17],
    )
    out = extreme_groups(df, "skin", {1: 0.80, 2: 0.95, 3: 0.70, 4: 0.95})
    assert list(out.index) == [11, 12, 14, 15, 16]
    assert out["skin"].tolist() == [0, 1, 0, 1, 1]
    assert out["target"].tolist() == [1, 0, 0, 1, 1]
    assert (out.attrs["g_max"], out.attrs["g_min"]) == (2, 3)
    # ties at the bottom: smallest id wins; all equal: two distinct groups, smallest ids
    out = extreme_groups(df, "skin", {1: 0.6, 2: 0.9, 3: 0.6})
    assert (out.attrs["g_max"], out.attrs["g_min"]) == (2, 1)
    out = extreme_groups(df, "skin", {3: 0.5, 1: 0.5, 2: 0.5})
    assert (out.attrs["g_max"], out.attrs["g_min"]) == (1, 2)
    # the reduced frame feeds group_balance, and source_index maps back to df's index
    bal = group_balance(extreme_groups(df, "skin", {1: 0.8, 2: 0.95, 3: 0.7}), "skin", seed=0)
    assert set(bal["source_index"]) <= {11, 12, 14, 15, 16}


def test_extreme_groups_errors():
    df = pd.DataFrame({"skin": [1, 2, 3], "target": [0, 1, 0]})
    with pytest.raises(ValueError, match="at least 2 groups"):
        extreme_groups(df, "skin", {1: 0.7})
    with pytest.raises(ValueError, match=r"groups \[9\] of auc_by_group do not occur in column 'skin'"):
        extreme_groups(df, "skin", {1: 0.7, 9: 0.8})
    with pytest.raises(ValueError, match=r"auc_by_group\[2\] must be a number"):
        extreme_groups(df, "skin", {1: 0.7, 2: float("nan")})
    with pytest.raises(ValueError, match="attribute column 'age'"):
        extreme_groups(df, "age", {1: 0.7, 2: 0.8})


def test_auc_by_group_against_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = rng.uniform(size=300)
    g = rng.integers(0, 5, 300)
    y[g == 4] = 0  # single-class group: excluded
    out = auc_by_group(y, p, g)
    assert list(out) == [0, 1, 2, 3]
    for k in out:
        assert out[k] == pytest.approx(roc_auc_score(y[g == k], p[g == k]))
