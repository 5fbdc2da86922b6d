"""The group-balanced external set D_r and the multi-attribute reduction (docs/algorithm.md §1, §8.4, §8.17).

:func:`group_balance` implements the authors' code's ``dataset_balance(df, attr, 'target', downsample=1)``:

1. G0 = rows with a = 0, G1 = rows with a = 1; rows with any other attribute value are dropped (and counted).
2. L = G0 and S = G1 if |G0| > |G1|, else L = G1 and S = G0 (a tie makes G1 the larger group).
3. S is kept entirely.
4. For each label c ∈ {0, 1}, n_c = |S ∩ {y = c}| rows are drawn from L ∩ {y = c}.
5. D_r = concat(L-sample for y = 0, L-sample for y = 1, S), index reset.

Both groups then have identical per-label counts and |D_r| = 2|S|. The authors' code draws with replacement from the
global NumPy RNG; here a seeded ``np.random.default_rng(seed)`` is used, and ``replace="auto"`` (the default, spec
§8.4) draws without replacement whenever L has enough rows of the label, so no row is duplicated.

:func:`extreme_groups` is SWiFT's multi-attribute reduction (docs/algorithm.md §1 steps 3-4): keep the groups with the
highest and the lowest AUC and recode them to a binary attribute, given the per-group AUCs
(:func:`fastmask.fairness.metrics.auc_by_group` computes them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from typing import Literal

import numpy as np
import pandas as pd

__all__ = ["group_balance", "extreme_groups"]

log = logging.getLogger(__name__)


def _require_column(df: pd.DataFrame, column: str, role: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if column not in df.columns:
        raise ValueError(f"{role} column {column!r} is not in the DataFrame (columns: {list(df.columns)})")


def group_balance(
    df: pd.DataFrame,
    attr: str,
    target: str = "target",
    *,
    seed: int | None = 42,
    replace: Literal["auto"] | bool = "auto",
    index_column: str = "source_index",
) -> pd.DataFrame:
    """Group-balanced external set D_r (docs/algorithm.md §1 steps 1-5, §8.4).

    Args:
        df: the external set D_e, one row per image.
        attr: the binary sensitive-attribute column (values 0 / 1; other values are dropped with a warning).
        target: the label column, values 0 / 1.
        seed: seed of the ``np.random.default_rng`` used for the draws; the same seed gives the same D_r.
        replace: ``True`` draws uniformly with replacement, as the authors' code does (faithful); ``False`` draws
            without replacement and raises when L has fewer rows of a label than S; ``"auto"`` (default) draws
            without replacement when |L ∩ {y=c}| >= n_c and with replacement otherwise, per label.
        index_column: name of the added column holding each row's index value in ``df`` (to map rows back to keys).

    Returns:
        D_r with a fresh RangeIndex: the L-sample of label 0, the L-sample of label 1, then S. ``attrs`` holds
        ``dropped_rows`` (rows without a 0/1 attribute), ``larger_group`` (the attribute value of L) and ``replace``
        (per label, whether that label was drawn with replacement).

    Raises:
        ValueError: a missing column, non-binary labels, an empty attribute group, or L having no rows (or, with
            ``replace=False``, too few rows) of a label that S has.
    """
    _require_column(df, attr, "attribute")
    _require_column(df, target, "target")
    if not (isinstance(replace, bool) or (isinstance(replace, str) and replace == "auto")):
        raise ValueError(f"replace must be 'auto', True or False, got {replace!r}")
    if index_column in df.columns:
        raise ValueError(f"index_column {index_column!r} already exists in the DataFrame; pass another name")

    keep = df[attr].isin([0, 1]).to_numpy()
    dropped = int((~keep).sum())
    if dropped:
        log.warning("group_balance: dropped %d of %d rows whose %r is not 0 or 1", dropped, len(df), attr)
    work = df.loc[keep].copy()
    work.insert(len(work.columns), index_column, df.index[keep])

    labels = work[target]
    bad = ~labels.isin([0, 1])
    if bad.any():
        raise ValueError(
            f"target column {target!r} must hold only 0 and 1; found {labels[bad].unique()[:5].tolist()} "
            f"in {int(bad.sum())} rows"
        )

    g0, g1 = work[work[attr] == 0], work[work[attr] == 1]
    for g, rows in ((0, g0), (1, g1)):
        if rows.empty:
            raise ValueError(f"attribute {attr!r} has no rows with value {g}; group balancing needs both groups")
    larger, smaller, larger_id = (g0, g1, 0) if len(g0) > len(g1) else (g1, g0, 1)

    rng = np.random.default_rng(seed)
    samples = []
    drawn_with_replacement = {}
    for c in (0, 1):
        n_c = int((smaller[target] == c).sum())
        pool = larger[larger[target] == c]
        if n_c > 0 and pool.empty:
            raise ValueError(
                f"attribute {attr!r}: the larger group ({attr}={larger_id}) has no rows with {target}={c}, "
                f"but the smaller group has {n_c}; cannot balance label {c}"
            )
        with_replacement = replace is True or (replace == "auto" and len(pool) < n_c)
        if replace is False and len(pool) < n_c:
            raise ValueError(
                f"attribute {attr!r}: the larger group ({attr}={larger_id}) has {len(pool)} rows with {target}={c}, "
                f"fewer than the {n_c} of the smaller group; use replace=True or 'auto'"
            )
        if with_replacement:
            # Faithful step 4: uniform positions with replacement (the authors' np.random.randint).
            pos = rng.integers(0, len(pool), size=n_c) if n_c else np.zeros(0, dtype=np.int64)
        else:
            pos = rng.choice(len(pool), size=n_c, replace=False)
        samples.append(pool.iloc[pos])
        drawn_with_replacement[c] = bool(with_replacement)

    out = pd.concat([*samples, smaller]).reset_index(drop=True)
    out.attrs.update(dropped_rows=dropped, larger_group=larger_id, replace=drawn_with_replacement)
    return out


def _extremes(aucs: Mapping[Hashable, float]) -> tuple[Hashable, Hashable]:
    """(g_max, g_min): highest and lowest AUC, ties broken by the smallest group id (docs/algorithm.md §8.17).

    max() and min() return the first extreme they meet, so iterating over sorted ids breaks ties by the smallest
    id. g_min is chosen among the groups other than g_max, so equal AUCs still give two distinct groups.
    """
    ids = sorted(aucs)
    g_max = max(ids, key=aucs.__getitem__)
    g_min = min((g for g in ids if g != g_max), key=aucs.__getitem__)
    return g_max, g_min


def extreme_groups(df: pd.DataFrame, attr: str, auc_by_group: Mapping[Hashable, float]) -> pd.DataFrame:
    """SWiFT's multi-attribute reduction (docs/algorithm.md §1 "Multi-attribute reduction", steps 3-4).

    g_max is the group with the highest AUC and g_min the one with the lowest (ties by the smallest group id).
    Only rows with ``attr`` in {g_max, g_min} are kept, and ``attr`` is recoded to 1 for g_min and 0 for g_max,
    so the binary pipeline (mask, balancing, both steps) runs on these rows only.

    Args:
        df: the external set D_e.
        attr: the multi-valued attribute column (e.g. Fitzpatrick type or an age bin).
        auc_by_group: AUC_g per group id, e.g. from :func:`fastmask.fairness.metrics.auc_by_group` on the pretrained
            model's predictions
            (only groups that contain both classes).

    Returns:
        The kept rows with their original index and the recoded ``attr`` (int); ``attrs["g_max"]`` and
        ``attrs["g_min"]`` hold the original group ids.
    """
    _require_column(df, attr, "attribute")
    if len(auc_by_group) < 2:
        raise ValueError(f"extreme_groups needs the AUC of at least 2 groups of {attr!r}, got {dict(auc_by_group)}")
    aucs: dict[Hashable, float] = {}
    for g, value in auc_by_group.items():
        try:
            aucs[g] = float(value)
        except (TypeError, ValueError):
            aucs[g] = math.nan
        if math.isnan(aucs[g]):
            raise ValueError(f"auc_by_group[{g!r}] must be a number, got {value!r}")
    present = set(df[attr].dropna().unique().tolist())
    missing = [g for g in aucs if g not in present]
    if missing:
        raise ValueError(f"groups {missing} of auc_by_group do not occur in column {attr!r}")
    try:
        g_max, g_min = _extremes(aucs)
    except TypeError as err:
        raise ValueError(f"group ids of {attr!r} must be of one sortable type to break ties") from err
    out = df.loc[df[attr].isin([g_max, g_min])].copy()
    out[attr] = (out[attr] == g_min).astype(np.int64)
    out.attrs.update(g_max=g_max, g_min=g_min)
    log.info("extreme_groups: %r keeps g_max=%r (a=0) and g_min=%r (a=1), %d rows", attr, g_max, g_min, len(out))
    return out
