"""Evaluation metrics of SWiFT and BMFT: accuracy, AUC and group-fairness gaps (docs/algorithm.md §6, §8.3, §8.17).

Every function takes labels y ∈ {0,1}, probabilities p = σ(z) ∈ [0,1] and the sensitive attribute a, as numpy arrays,
torch tensors, pandas Series or lists, of shape (N,) or (N, 1). Hard predictions are ŷ = 1 iff p > t, with the decision
threshold t = 0.5 by default: the authors' code's ``np.round(p)`` (0.5 rounds to 0). A model debiased with a
validation-chosen global threshold (:func:`choose_threshold`; one t for everyone, so no attribute is needed at
inference) is scored at its own t.

The binary gaps (SPD, EOpp, EOdds) need a ⊆ {0,1}; an empty cell's rate is 0, as in the authors' code, so a gap
against a missing group compares with 0. With TPR_g = mean(ŷ | a=g, y=1) and FPR_g = mean(ŷ | a=g, y=0):

- SPD = |m_0(ŷ) − m_1(ŷ)|
- EOpp = |TPR_0 − TPR_1|
- EOdds ``"mean"`` = ½·(|ΔTPR| + |ΔFPR|); ``"max"`` = max(|ΔTPR|, |ΔFPR|) (fairlearn's
  ``equalized_odds_difference``); ``"code"`` = ½·|(FPR_0 − FPR_1) + (TPR_0 − TPR_1)|, the signed sum the authors' code
  reports (docs/algorithm.md §8.3). Opposite-signed TPR and FPR gaps cancel in the signed sum, so fastmask never
  reports it alone: :func:`evaluate` returns all three, and every summary shows the mean and max forms beside it.

The per-group functions (:func:`group_table`, :func:`auc_by_group`, :func:`worst_group_auc`, :func:`auc_gap`)
accept any number of attribute values ([PS] Table 5: Min AUC and Gap = max_g AUC_g − min_g AUC_g, over the groups
that contain both classes, docs/algorithm.md §8.17).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

__all__ = [
    "THRESHOLD",
    "hard_predictions",
    "auc",
    "acc",
    "spd",
    "eopp",
    "eodds",
    "group_table",
    "auc_by_group",
    "worst_group_auc",
    "auc_gap",
    "evaluate",
    "choose_threshold",
]

THRESHOLD = 0.5
EOddsDefinition = Literal["code", "max", "mean"]
ArrayLike = np.ndarray | torch.Tensor | pd.Series | Sequence[Any]


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a 1-D numpy array; accepts shape (N,) or (N, 1)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) or (N, 1), got {arr.shape}")
    return arr


def _check_binary(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must contain only the values 0 and 1, got dtype {arr.dtype}")
    ok = (arr == 0) | (arr == 1)
    if not np.all(ok):
        bad = np.unique(arr[~ok])[:5].tolist()
        raise ValueError(f"{name} must contain only the values 0 and 1, found {bad}")
    return arr.astype(np.int64)


def _labels_probs(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    yv = _check_binary(_vector(y, "y"), "y")
    pv = _vector(p, "p").astype(np.float64)
    if pv.shape != yv.shape:
        raise ValueError(f"p has {pv.shape[0]} entries but y has {yv.shape[0]}")
    if pv.size == 0:
        raise ValueError("y and p are empty")
    if not np.all((pv >= 0) & (pv <= 1)):  # also catches NaN
        raise ValueError(
            "p must hold probabilities in [0, 1] (pass sigmoid(logits), not logits); found "
            f"{pv[~((pv >= 0) & (pv <= 1))][:5].tolist()}"
        )
    return yv, pv


def _groups(a: ArrayLike, n: int) -> np.ndarray:
    av = _vector(a, "a")
    if av.shape[0] != n:
        raise ValueError(f"a has {av.shape[0]} entries but y has {n}")
    missing = pd.isna(av)
    if missing.any():
        raise ValueError(f"a has {int(missing.sum())} missing values (NaN/None); drop or recode those rows first")
    return av


def _binary_inputs(y: ArrayLike, p: ArrayLike, a: ArrayLike,
                   threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yv, pv = _labels_probs(y, p)
    av = _check_binary(_groups(a, yv.shape[0]), "a (the binary gaps need a sensitive attribute with values 0/1)")
    return yv, hard_predictions(pv, threshold), av


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return float(threshold)


def hard_predictions(p: ArrayLike, threshold: float = THRESHOLD) -> np.ndarray:
    """Hard predictions ŷ = 1 iff p > ``threshold``; the default 0.5 is the authors' code's ``np.round(p)``
    (docs/algorithm.md §6)."""
    return (_vector(p, "p") > _check_threshold(threshold)).astype(np.int64)


def _rate(yhat: np.ndarray, mask: np.ndarray) -> float:
    """mean(ŷ) over ``mask``; an empty cell gives 0 as in the authors' code (docs/algorithm.md §6)."""
    return float(yhat[mask].mean()) if mask.any() else 0.0


def _gaps(yv: np.ndarray, yhat: np.ndarray, av: np.ndarray) -> tuple[float, float]:
    """Signed (TPR_0 − TPR_1, FPR_0 − FPR_1) with zero-filled empty cells."""
    tpr = [_rate(yhat, (av == g) & (yv == 1)) for g in (0, 1)]
    fpr = [_rate(yhat, (av == g) & (yv == 0)) for g in (0, 1)]
    return tpr[0] - tpr[1], fpr[0] - fpr[1]


def auc(y: ArrayLike, p: ArrayLike) -> float:
    """Area under the ROC curve, ``sklearn.metrics.roc_auc_score(y, p)`` on probabilities (docs/algorithm.md §6)."""
    yv, pv = _labels_probs(y, p)
    if np.unique(yv).size < 2:
        raise ValueError(f"AUC needs both classes in y, but every label is {int(yv[0])}")
    return float(roc_auc_score(yv, pv))


def acc(y: ArrayLike, p: ArrayLike, *, threshold: float = THRESHOLD) -> float:
    """Accuracy mean(ŷ = y) with ŷ = 1 iff p > ``threshold`` (docs/algorithm.md §6)."""
    yv, pv = _labels_probs(y, p)
    return float(np.mean(hard_predictions(pv, threshold) == yv))


def spd(y: ArrayLike, p: ArrayLike, a: ArrayLike, *, threshold: float = THRESHOLD) -> float:
    """Statistical parity difference |m_0(ŷ) − m_1(ŷ)|, an empty group's rate being 0 (docs/algorithm.md §6)."""
    _, yhat, av = _binary_inputs(y, p, a, threshold)
    return _spd(yhat, av)


def _spd(yhat: np.ndarray, av: np.ndarray) -> float:
    return abs(_rate(yhat, av == 0) - _rate(yhat, av == 1))


def eopp(y: ArrayLike, p: ArrayLike, a: ArrayLike, *, threshold: float = THRESHOLD) -> float:
    """Equal-opportunity gap |TPR_0 − TPR_1| with zero-filled empty cells (docs/algorithm.md §6)."""
    d_tpr, _ = _gaps(*_binary_inputs(y, p, a, threshold))
    return abs(d_tpr)


def eodds(y: ArrayLike, p: ArrayLike, a: ArrayLike, *, definition: EOddsDefinition = "code",
          threshold: float = THRESHOLD) -> float:
    """Equalized-odds gap in one of three definitions (docs/algorithm.md §6, §8.3).

    - ``"code"`` (the signed sum the authors' code reports; opposite gaps cancel in it, so report it only beside the
      other two): ½·|(FPR_0 − FPR_1) + (TPR_0 − TPR_1)|;
    - ``"max"`` (fairlearn ``equalized_odds_difference``): max(|TPR_0 − TPR_1|, |FPR_0 − FPR_1|);
    - ``"mean"``: ½·(|TPR_0 − TPR_1| + |FPR_0 − FPR_1|).

    Empty cells have rate 0.
    """
    if definition not in ("code", "max", "mean"):
        raise ValueError(f"definition must be one of ['code', 'max', 'mean'], got {definition!r}")
    return _eodds_from_gaps(*_gaps(*_binary_inputs(y, p, a, threshold)), definition)


def _eodds_from_gaps(d_tpr: float, d_fpr: float, definition: EOddsDefinition) -> float:
    if definition == "code":
        return 0.5 * abs(d_fpr + d_tpr)
    if definition == "max":
        return max(abs(d_tpr), abs(d_fpr))
    return 0.5 * (abs(d_tpr) + abs(d_fpr))


def _sorted_groups(av: np.ndarray) -> list[Hashable]:
    try:
        return sorted(pd.unique(av).tolist())
    except TypeError as err:
        raise ValueError("a must hold values of one sortable type (group ids are ordered to break ties)") from err


def group_table(y: ArrayLike, p: ArrayLike, a: ArrayLike, *, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Per-group metrics, one row per attribute value (sorted), any number of groups.

    Columns: ``n``, ``positives`` (Σy), ``auc`` (NaN unless the group holds both classes), ``acc``, ``tpr``
    (NaN without positives), ``fpr`` (NaN without negatives) and ``positive_rate`` (mean ŷ). Unlike the gap
    metrics, undefined rates are NaN here rather than the authors' code's 0, so the table shows they are missing.
    """
    yv, pv = _labels_probs(y, p)
    av = _groups(a, yv.shape[0])
    yhat = hard_predictions(pv, threshold)
    rows = []
    groups = _sorted_groups(av)
    for g in groups:
        m = av == g
        yg, pg, hg = yv[m], pv[m], yhat[m]
        pos, neg = yg == 1, yg == 0
        rows.append(
            {
                "n": int(m.sum()),
                "positives": int(pos.sum()),
                "auc": float(roc_auc_score(yg, pg)) if pos.any() and neg.any() else float("nan"),
                "acc": float(np.mean(hg == yg)),
                "tpr": float(hg[pos].mean()) if pos.any() else float("nan"),
                "fpr": float(hg[neg].mean()) if neg.any() else float("nan"),
                "positive_rate": float(hg.mean()),
            }
        )
    return pd.DataFrame(rows, index=pd.Index(groups, name="group"))


def auc_by_group(y: ArrayLike, p: ArrayLike, groups: ArrayLike) -> dict[Hashable, float]:
    """AUC_g for every group g that contains both classes, keyed by group id in sorted order (docs/algorithm.md
    §8.17)."""
    yv, pv = _labels_probs(y, p)
    gv = _groups(groups, yv.shape[0])
    out: dict[Hashable, float] = {}
    for g in _sorted_groups(gv):
        m = gv == g
        if np.unique(yv[m]).size == 2:
            out[g] = float(roc_auc_score(yv[m], pv[m]))
    return out


def _aucs_or_raise(y: ArrayLike, p: ArrayLike, a: ArrayLike) -> dict[Hashable, float]:
    aucs = auc_by_group(y, p, a)
    if not aucs:
        raise ValueError("no group of a contains both classes, so no group AUC is defined")
    return aucs


def worst_group_auc(y: ArrayLike, p: ArrayLike, a: ArrayLike) -> float:
    """Min AUC = min_g AUC_g over the groups that contain both classes ([PS] Table 5, docs/algorithm.md §8.17)."""
    return min(_aucs_or_raise(y, p, a).values())


def auc_gap(y: ArrayLike, p: ArrayLike, a: ArrayLike) -> float:
    """Gap = max_g AUC_g − min_g AUC_g over the groups that contain both classes ([PS] Table 5, docs/algorithm.md
    §8.17)."""
    values = _aucs_or_raise(y, p, a).values()
    return max(values) - min(values)


def evaluate(y: ArrayLike, p: ArrayLike, a: ArrayLike, *, threshold: float = THRESHOLD) -> dict[str, float]:
    """All scalar metrics of docs/algorithm.md §6 for a binary attribute, as Python floats, with ŷ = 1[p > threshold].

    Keys: ``auc``, ``acc``, ``spd``, ``eopp``, ``eodds`` (the code definition, the signed sum), ``eodds_max``,
    ``eodds_mean``, ``worst_group_auc``, ``auc_gap``, ``positive_rate`` (mean ŷ), ``label_positive_rate`` (mean y)
    and ``threshold``.

    Raises:
        ValueError: y holds one class only, no group holds both classes, a is not 0/1, or p is not in [0, 1].
    """
    yv, yhat, av = _binary_inputs(y, p, a, threshold)
    pv = _vector(p, "p").astype(np.float64)
    d_tpr, d_fpr = _gaps(yv, yhat, av)
    aucs = _aucs_or_raise(yv, pv, av)
    return {
        "auc": auc(yv, pv),
        "acc": float(np.mean(yhat == yv)),
        "spd": _spd(yhat, av),
        "eopp": abs(d_tpr),
        "eodds": _eodds_from_gaps(d_tpr, d_fpr, "code"),
        "eodds_max": _eodds_from_gaps(d_tpr, d_fpr, "max"),
        "eodds_mean": _eodds_from_gaps(d_tpr, d_fpr, "mean"),
        "worst_group_auc": min(aucs.values()),
        "auc_gap": max(aucs.values()) - min(aucs.values()),
        "positive_rate": float(yhat.mean()),
        "label_positive_rate": float(yv.mean()),
        "threshold": float(threshold),
    }


def auc_standard_error(y: ArrayLike, p: ArrayLike) -> float:
    """DeLong et al.'s (1988) standard error of the AUC of scores ``p`` for labels ``y``, from its structural
    components: for each positive i, V10_i = the share of negatives it outscores (ties count ½); for each negative j,
    V01_j = the share of positives that outscore it; SE² = var(V10) / m + var(V01) / n (m positives, n negatives).
    What a validation AUC is worth: budgets far below it are judged within the noise of the validation part."""
    yv, pv = _vector(y, "y"), _vector(p, "p").astype(np.float64)
    pos, neg = np.sort(pv[yv == 1]), np.sort(pv[yv == 0])
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise ValueError(f"auc_standard_error needs two samples of each class, got {m} positives and {n} negatives")

    def share_below(x: np.ndarray, of: np.ndarray) -> np.ndarray:  # share of ``of`` below x, ties counting ½
        lo, hi = np.searchsorted(of, x, "left"), np.searchsorted(of, x, "right")
        return (lo + 0.5 * (hi - lo)) / len(of)

    v10, v01 = share_below(pos, neg), 1.0 - share_below(neg, pos)
    return math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


ThresholdRule = Literal["accuracy", "rate"]
THRESHOLD_RULES = ("accuracy", "rate")


def choose_threshold(y: ArrayLike, p: ArrayLike, rule: ThresholdRule = "accuracy") -> float:
    """A global decision threshold t (ŷ = 1 iff p > t) chosen from labelled scores, one for everyone: it needs no
    attribute at inference.

    The candidates are the midpoints between consecutive distinct scores, and one cut below the smallest and one at
    the largest score (everyone positive, everyone negative). ``rule``:

    - ``"accuracy"``: the t of the highest accuracy mean(ŷ = y);
    - ``"rate"``: the t whose share of ŷ = 1 is closest to the label rate mean(y).

    Ties go to the candidate closest to 0.5 (the untuned threshold), then to the smaller one.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {list(THRESHOLD_RULES)}, got {rule!r}")
    yv, pv = _labels_probs(y, p)
    u = np.unique(pv)
    # cuts[j] separates u[:j] (ŷ = 0) from u[j:] (ŷ = 1), j = 0 .. len(u)
    cuts = np.concatenate([[max(0.0, u[0] - (u[1] - u[0] if len(u) > 1 else 0.5) / 2)], (u[:-1] + u[1:]) / 2, [u[-1]]])
    below = np.searchsorted(np.sort(pv), u, side="right")  # elements <= u[j]
    n = len(yv)
    negatives_le = np.concatenate([[0], np.searchsorted(np.sort(pv[yv == 0]), u, side="right")])
    positives_le = np.concatenate([[0], np.searchsorted(np.sort(pv[yv == 1]), u, side="right")])
    if rule == "accuracy":
        score = (negatives_le + (yv.sum() - positives_le)) / n  # negatives below the cut + positives above it
    else:
        predicted_positive = 1.0 - np.concatenate([[0], below]) / n
        score = -np.abs(predicted_positive - yv.mean())
    best = np.flatnonzero(score == score.max())
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])
