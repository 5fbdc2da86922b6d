"""Tests of fastmask.fairness.metrics against sklearn, fairlearn and hand-computed cases (docs/algorithm.md §6, §8.3,
§8.17)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, roc_auc_score

from fastmask.fairness import metrics as M


def _random(seed: int, n: int = 200, groups: int = 2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = rng.integers(0, groups, n)
    # probabilities on a grid so that exact 0.5 values (which must predict 0) occur
    p = np.round(rng.uniform(0, 1, n) * 8) / 8
    return y, p, a


def _fairlearn_rates(y, p, a):
    yhat = (p > 0.5).astype(int)
    mf = MetricFrame(
        metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "sel": selection_rate},
        y_true=y,
        y_pred=yhat,
        sensitive_features=a,
    )
    return yhat, mf.by_group


cells = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 8), st.integers(0, 1)), min_size=8, max_size=80)


@settings(max_examples=30, deadline=None)
@given(rows=cells)
def test_gaps_match_fairlearn(rows):
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] / 8 for r in rows])
    a = np.array([r[2] for r in rows])
    # fairlearn's rates are undefined (NaN / warnings) for empty cells; those are the hand cases below.
    assume(all(((a == g) & (y == c)).any() for g in (0, 1) for c in (0, 1)))
    yhat, by_group = _fairlearn_rates(y, p, a)
    d_tpr = by_group.loc[0, "tpr"] - by_group.loc[1, "tpr"]
    d_fpr = by_group.loc[0, "fpr"] - by_group.loc[1, "fpr"]
    assert M.spd(y, p, a) == pytest.approx(demographic_parity_difference(y, yhat, sensitive_features=a), abs=1e-12)
    assert M.eopp(y, p, a) == pytest.approx(abs(d_tpr), abs=1e-12)
    assert M.eodds(y, p, a, definition="code") == pytest.approx(0.5 * abs(d_tpr + d_fpr), abs=1e-12)
    assert M.eodds(y, p, a, definition="max") == pytest.approx(
        equalized_odds_difference(y, yhat, sensitive_features=a), abs=1e-12
    )
    assert M.eodds(y, p, a, definition="mean") == pytest.approx(
        equalized_odds_difference(y, yhat, sensitive_features=a, agg="mean"), abs=1e-12
    )
    assert M.acc(y, p) == pytest.approx(accuracy_score(y, yhat), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auc_acc_match_sklearn(seed):
    y, p, a = _random(seed)
    assert M.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.acc(y, p) == pytest.approx(accuracy_score(y, p > 0.5), abs=1e-12)


def test_threshold_half_predicts_zero():
    # np.round(0.5) == 0: p = 0.5 is a negative prediction.
    assert M.hard_predictions(np.array([0.5, 0.5000001, 0.49, 1.0, 0.0])).tolist() == [0, 1, 0, 1, 0]
    assert M.acc([0, 1], [0.5, 0.5]) == 0.5


def test_accepts_torch_lists_series_and_columns():
    y, p, a = _random(7, n=50)
    ref = M.evaluate(y, p, a)
    as_torch = M.evaluate(torch.tensor(y).view(-1, 1), torch.tensor(p, dtype=torch.float32), torch.tensor(a).bool())
    assert as_torch == pytest.approx(ref, abs=1e-6)
    assert M.evaluate(list(y), pd.Series(p), a.astype(float)) == pytest.approx(ref, abs=1e-12)
    assert M.eodds(torch.tensor(y), torch.tensor(p, dtype=torch.bfloat16), torch.tensor(a)) >= 0.0


def test_empty_cells_hand_case():
    # group 0: y = [1, 0, 0], ŷ = [1, 1, 0]     -> TPR_0 = 1, FPR_0 = 1/2, rate_0 = 2/3
    # group 1: y = [0, 0],    ŷ = [1, 0]        -> TPR_1 = 0 (no positives, zero-filled), FPR_1 = 1/2, rate_1 = 1/2
    y = [1, 0, 0, 0, 0]
    p = [0.9, 0.7, 0.2, 0.6, 0.1]
    a = [0, 0, 0, 1, 1]
    assert M.spd(y, p, a) == pytest.approx(2 / 3 - 1 / 2)
    assert M.eopp(y, p, a) == pytest.approx(1.0)
    assert M.eodds(y, p, a) == pytest.approx(0.5 * abs((0.5 - 0.5) + (1 - 0)))
    assert M.eodds(y, p, a, definition="max") == pytest.approx(1.0)
    assert M.eodds(y, p, a, definition="mean") == pytest.approx(0.5)


def test_missing_group_hand_case():
    # only group 1 present: group 0's rates are all 0 (reference zero-fill).
    y, p, a = [1, 1, 0], [0.9, 0.2, 0.8], [1, 1, 1]
    # TPR_1 = 1/2, FPR_1 = 1, rate_1 = 2/3
    assert M.spd(y, p, a) == pytest.approx(2 / 3)
    assert M.eopp(y, p, a) == pytest.approx(0.5)
    assert M.eodds(y, p, a) == pytest.approx(0.5 * abs(-1 - 0.5))
    assert M.eodds(y, p, a, definition="max") == pytest.approx(1.0)
    assert M.eodds(y, p, a, definition="mean") == pytest.approx(0.75)


def test_code_eodds_cancels_opposite_gaps():
    # group 0: TPR 1, FPR 0 ; group 1: TPR 0, FPR 1 -> ΔTPR = +1, ΔFPR = -1.
    y, p, a = [1, 0, 1, 0], [0.9, 0.1, 0.1, 0.9], [0, 0, 1, 1]
    assert M.eodds(y, p, a) == 0.0
    assert M.eodds(y, p, a, definition="max") == 1.0
    assert M.eodds(y, p, a, definition="mean") == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_group_table_multi_group(seed):
    y, p, a = _random(seed, n=300, groups=4)
    a = np.where(a == 3, 7, a)  # non-contiguous ids
    # a group with a single class: AUC NaN, fpr NaN
    y = np.where(a == 2, 1, y)
    t = M.group_table(y, p, a)
    assert list(t.index) == [0, 1, 2, 7]
    yhat = (p > 0.5).astype(int)
    _, by_group = _fairlearn_rates(y, p, a)
    for g in t.index:
        m = a == g
        assert t.loc[g, "n"] == m.sum() and t.loc[g, "positives"] == y[m].sum()
        assert t.loc[g, "acc"] == pytest.approx(accuracy_score(y[m], yhat[m]))
        assert t.loc[g, "positive_rate"] == pytest.approx(by_group.loc[g, "sel"])
        assert t.loc[g, "tpr"] == pytest.approx(by_group.loc[g, "tpr"])
        if g == 2:
            assert math.isnan(t.loc[g, "auc"]) and math.isnan(t.loc[g, "fpr"])
        else:
            assert t.loc[g, "auc"] == pytest.approx(roc_auc_score(y[m], p[m]))
            assert t.loc[g, "fpr"] == pytest.approx(by_group.loc[g, "fpr"])
    aucs = {g: roc_auc_score(y[a == g], p[a == g]) for g in (0, 1, 7)}
    assert M.auc_by_group(y, p, a) == pytest.approx(aucs)
    assert list(M.auc_by_group(y, p, a)) == [0, 1, 7]
    assert M.worst_group_auc(y, p, a) == pytest.approx(min(aucs.values()))
    assert M.auc_gap(y, p, a) == pytest.approx(max(aucs.values()) - min(aucs.values()))


def test_group_table_string_groups():
    y = [0, 1, 0, 1, 1]
    p = [0.2, 0.8, 0.6, 0.4, 0.9]
    a = ["V", "V", "II", "II", "II"]
    t = M.group_table(y, p, a)
    assert list(t.index) == ["II", "V"]
    # group II: y = [0, 1, 1], p = [.6, .4, .9]: pairs (pos > neg): .4 > .6 no, .9 > .6 yes -> AUC 1/2
    assert t.loc["II", "auc"] == pytest.approx(0.5)
    assert t.loc["V", "auc"] == pytest.approx(1.0)
    assert M.worst_group_auc(y, p, a) == pytest.approx(0.5)
    assert M.auc_gap(y, p, a) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_keys_and_values(seed):
    y, p, a = _random(seed, n=400)
    out = M.evaluate(y, p, a)
    yhat, by_group = _fairlearn_rates(y, p, a)
    d_tpr = by_group.loc[0, "tpr"] - by_group.loc[1, "tpr"]
    d_fpr = by_group.loc[0, "fpr"] - by_group.loc[1, "fpr"]
    aucs = [roc_auc_score(y[a == g], p[a == g]) for g in (0, 1)]
    expect = {
        "auc": roc_auc_score(y, p),
        "acc": accuracy_score(y, yhat),
        "spd": demographic_parity_difference(y, yhat, sensitive_features=a),
        "eopp": abs(d_tpr),
        "eodds": 0.5 * abs(d_tpr + d_fpr),
        "eodds_max": equalized_odds_difference(y, yhat, sensitive_features=a),
        "eodds_mean": equalized_odds_difference(y, yhat, sensitive_features=a, agg="mean"),
        "worst_group_auc": min(aucs),
        "auc_gap": max(aucs) - min(aucs),
        "positive_rate": yhat.mean(),
        "label_positive_rate": y.mean(),
        "threshold": 0.5,
    }
    assert set(out) == set(expect)
    assert out == pytest.approx(expect, abs=1e-12)
    assert all(type(v) is float for v in out.values())


def test_errors():
    y, p, a = [0, 1, 1], [0.1, 0.7, 0.9], [0, 1, 1]
    with pytest.raises(ValueError, match="p must hold probabilities"):
        M.acc(y, [0.1, 2.0, 0.3])
    with pytest.raises(ValueError, match="p must hold probabilities"):
        M.auc(y, [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="y must contain only the values 0 and 1"):
        M.auc([0, 2, 1], p)
    with pytest.raises(ValueError, match="AUC needs both classes"):
        M.auc([1, 1, 1], p)
    with pytest.raises(ValueError, match=r"a \(the binary gaps need"):
        M.spd(y, p, [0, 1, 2])
    with pytest.raises(ValueError, match=r"a \(the binary gaps need"):
        M.evaluate(y, p, ["x", "y", "x"])
    with pytest.raises(ValueError, match="a has 2 entries but y has 3"):
        M.eodds(y, p, [0, 1])
    with pytest.raises(ValueError, match="p has 2 entries but y has 3"):
        M.acc(y, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"p must have shape \(N,\) or \(N, 1\)"):
        M.acc(y, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="definition must be one of"):
        M.eodds(y, p, a, definition="avg")
    with pytest.raises(ValueError, match="no group of a contains both classes"):
        M.worst_group_auc([0, 1, 1], p, [0, 1, 2])
    with pytest.raises(ValueError, match="missing values"):
        M.group_table(y, p, [0.0, float("nan"), 1.0])


# ---- the decision threshold -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("t", [0.3, 0.625, 0.9])
def test_every_metric_at_a_threshold_against_fairlearn(seed, t):
    y, p, a = _random(seed, n=400)
    yhat = (p > t).astype(int)
    mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y, y_pred=yhat,
                     sensitive_features=a).by_group
    out = M.evaluate(y, p, a, threshold=t)
    assert out["acc"] == pytest.approx(accuracy_score(y, yhat), abs=1e-12)
    assert out["spd"] == pytest.approx(demographic_parity_difference(y, yhat, sensitive_features=a), abs=1e-12)
    assert out["eodds_max"] == pytest.approx(equalized_odds_difference(y, yhat, sensitive_features=a), abs=1e-12)
    assert out["eopp"] == pytest.approx(abs(mf.loc[0, "tpr"] - mf.loc[1, "tpr"]), abs=1e-12)
    assert out["positive_rate"] == pytest.approx(yhat.mean()) and out["threshold"] == t
    assert out["auc"] == pytest.approx(roc_auc_score(y, p))  # AUC does not depend on it
    assert M.acc(y, p, threshold=t) == out["acc"] and M.spd(y, p, a, threshold=t) == out["spd"]
    assert M.group_table(y, p, a, threshold=t)["positive_rate"].tolist() == pytest.approx(
        [yhat[a == g].mean() for g in (0, 1)])
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        M.evaluate(y, p, a, threshold=1.5)


def _cuts(p: np.ndarray) -> np.ndarray:
    """Every distinct partition of the scores by a threshold: one cut below all, between each pair of neighbours,
    and at the top (the independent oracle for choose_threshold)."""
    u = np.unique(p)
    return np.concatenate([[u[0] / 2], (u[:-1] + u[1:]) / 2, [u[-1]]])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 2**16), rule=st.sampled_from(["accuracy", "rate"]))
def test_choose_threshold_is_the_best_cut(n, seed, rule):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    assume(0 < y.sum() < n)
    p = np.round(rng.uniform(0, 1, n), int(rng.integers(1, 4)))  # ties on purpose
    t = M.choose_threshold(y, p, rule)
    if rule == "accuracy":
        best = max(M.acc(y, p, threshold=c) for c in _cuts(p))
        assert M.acc(y, p, threshold=t) == best
    else:
        best = min(abs((p > c).mean() - y.mean()) for c in _cuts(p))
        assert abs((p > t).mean() - y.mean()) == pytest.approx(best, abs=1e-12)


def test_choose_threshold_prefers_the_cut_closest_to_one_half():
    # every cut between 0.2 and 0.8 separates the classes perfectly: the one kept is 0.5, the untuned threshold
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    assert M.choose_threshold(y, p) == pytest.approx(0.5)
    # a shifted model: every score of the negatives above 0.5, accuracy 1 needs t = 0.7
    y, p = np.array([0, 0, 1, 1]), np.array([0.6, 0.65, 0.75, 0.9])
    assert M.choose_threshold(y, p) == pytest.approx(0.7) and M.acc(y, p, threshold=0.7) == 1.0
    assert (np.array([0.6, 0.65, 0.75, 0.9]) > M.choose_threshold(y, p, "rate")).mean() == 0.5
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        M.choose_threshold(y, p, "f1")


def test_auc_standard_error_matches_the_spread_of_auc_over_samples():
    """DeLong's standard error, estimated from one data set, against the Monte-Carlo spread of the AUC over 2,000
    data sets drawn from one binormal model (scores N(0, 1) for negatives, N(μ, 1) for positives), at two sizes and
    separations; and, on scores with many ties, against the structural components computed pair by pair."""
    rng = np.random.default_rng(0)
    for n_pos, n_neg, mu in ((40, 160, 1.5), (150, 150, 0.8)):
        aucs = []
        for _ in range(2000):
            p = np.concatenate([rng.normal(mu, 1, n_pos), rng.normal(0, 1, n_neg)])
            y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
            aucs.append(roc_auc_score(y, p))
        spread = float(np.std(aucs, ddof=1))
        estimates = []
        for _ in range(50):
            p = np.concatenate([rng.normal(mu, 1, n_pos), rng.normal(0, 1, n_neg)])
            estimates.append(M.auc_standard_error(np.r_[np.ones(n_pos), np.zeros(n_neg)], p))
        assert float(np.mean(estimates)) == pytest.approx(spread, rel=0.1), (n_pos, n_neg, mu, spread)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + 0.3 * y, 1)  # six score levels: ties everywhere
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    pairwise = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    assert M.auc_standard_error(y, p) == pytest.approx(pairwise, rel=1e-12)
    with pytest.raises(ValueError, match="two samples of each class"):
        M.auc_standard_error([1, 0, 0], [0.9, 0.1, 0.2])
