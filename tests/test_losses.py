"""Tests of fastmask.fairness.losses against hand-computed values and plain-numpy transcriptions of docs/algorithm.md
§2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmask.fairness.losses import BMFT_BIAS, BMFT_PAPER_BIAS, SWIFT_BIAS, BiasSpec, bias_loss, combined_loss, wbce

FORMS = ["eodds_abs", "eodds_sum", "eodds_avgodds", "eopp", "spd"]
SPACES = ["log", "prob", "logit"]

# A batch with every cell filled. Logit-space cell means:
#   (a0,y0): z = 1, 3 -> m00 = 2      (a0,y1): z = 5     -> m01 = 5
#   (a1,y0): z = 4    -> m10 = 4      (a1,y1): z = -2, 0 -> m11 = -1
# FPR gap m00 - m10 = -2, TPR gap m01 - m11 = 6, m0 = 9/3 = 3, m1 = 2/3.
Z = [1.0, 3.0, 5.0, 4.0, -2.0, 0.0]
Y = [0, 0, 1, 0, 1, 1]
A = [0, 0, 0, 1, 1, 1]
HAND_LOGIT = {
    "eodds_abs": 6 + 2,  # |6| + |-2|
    "eodds_sum": 0.5 * abs(-2 + 6),
    "eodds_avgodds": 0.5 * (6 + 2),
    "eopp": 6.0,
    "spd": abs(3 - 2 / 3),
}


def _t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("form", FORMS)
def test_logit_space_hand_values(form):
    z = _t(Z, grad=True)
    out = bias_loss(z, _t(Y), _t(A), space="logit", form=form)
    assert isinstance(out, torch.Tensor) and out.dim() == 0
    assert out.item() == pytest.approx(HAND_LOGIT[form], abs=1e-12)


def test_eodds_sum_cancels_opposite_gaps():
    # m00 - m10 = 2 - 4 = -2 and m01 - m11 = 5 - 3 = +2: the code's signed sum is 0, the paper's form is 4.
    z = _t([1.0, 3.0, 5.0, 4.0, 2.0, 4.0])
    assert bias_loss(z, _t(Y), _t(A), space="logit", form="eodds_sum").item() == pytest.approx(0.0, abs=1e-12)
    assert bias_loss(z, _t(Y), _t(A), space="logit", form="eodds_abs").item() == pytest.approx(4.0, abs=1e-12)
    assert bias_loss(z, _t(Y), _t(A), space="logit", form="eodds_avgodds").item() == pytest.approx(2.0, abs=1e-12)


def test_prob_and_log_space_hand_values():
    # z = ±ln 3 gives p = 0.75 / 0.25 exactly; z = 0 gives 0.5.
    l3 = math.log(3.0)
    z = _t([0.0, -l3, l3, -l3, l3, 0.0])
    y, a = _t([0, 1, 1, 0, 1, 0]), _t([0, 0, 0, 1, 1, 1])
    # cells: (a0,y0) p=.5 ; (a0,y1) p=.25,.75 -> mean .5 ; (a1,y0) p=.25,.5 -> .375 ; (a1,y1) p=.75
    # [PB] Eq. 2 (BMFT paper): |m01(p) - m11(p)| = |0.5 - 0.75|
    assert BMFT_PAPER_BIAS(z, y, a).item() == pytest.approx(0.25, abs=1e-12)
    assert bias_loss(z, y, a, space="prob", form="eodds_abs").item() == pytest.approx(0.25 + 0.125, abs=1e-12)
    # [PS] Eqs. 2-4 on log p.
    m01 = (math.log(0.25) + math.log(0.75)) / 2
    m11 = math.log(0.75)
    m00 = math.log(0.5)
    m10 = (math.log(0.25) + math.log(0.5)) / 2
    expect = abs(m01 - m11) + abs(m00 - m10)
    assert SWIFT_BIAS(z, y, a).item() == pytest.approx(expect, abs=1e-12)
    assert bias_loss(z, y, a).item() == pytest.approx(expect, abs=1e-12)  # defaults are SWiFT's


def test_presets():
    assert (SWIFT_BIAS.space, SWIFT_BIAS.form, SWIFT_BIAS.empty) == ("log", "eodds_abs", "zero")
    assert (BMFT_BIAS.space, BMFT_BIAS.form, BMFT_BIAS.empty) == ("logit", "eodds_sum", "zero")
    assert BMFT_BIAS(_t(Z), _t(Y), _t(A)).item() == pytest.approx(HAND_LOGIT["eodds_sum"], abs=1e-12)
    with pytest.raises(ValueError, match="form"):
        BiasSpec(form="eodds")
    with pytest.raises(ValueError, match="space"):
        BiasSpec(space="probability")
    with pytest.raises(ValueError, match="empty"):
        BiasSpec(empty="nan")
    with pytest.raises(AttributeError):
        SWIFT_BIAS.form = "spd"  # frozen


def test_logit_gradient_by_hand():
    # eopp = |m01 - m11| with m01 - m11 = 6 > 0: d/dz = +1/1 on the (a0,y1) sample, -1/2 on the two (a1,y1) samples.
    z = _t(Z, grad=True)
    bias_loss(z, _t(Y), _t(A), space="logit", form="eopp").backward()
    assert z.grad.tolist() == pytest.approx([0, 0, 1.0, 0, -0.5, -0.5])
    # eodds_sum = ½|(m00 - m10) + (m01 - m11)| with a positive inside: ½ · (±1/n_cell).
    z = _t(Z, grad=True)
    BMFT_BIAS(z, _t(Y), _t(A)).backward()
    assert z.grad.tolist() == pytest.approx([0.25, 0.25, 0.5, -0.5, -0.25, -0.25])


def test_accepts_column_shapes_and_dtypes():
    z = _t(Z).view(-1, 1)
    y = torch.tensor(Y, dtype=torch.bool).view(-1, 1)
    a = torch.tensor(A, dtype=torch.int64)
    assert bias_loss(z, y, a, space="logit", form="eopp").item() == pytest.approx(6.0)
    assert wbce(z, y.float()).shape == ()


# Empty cells. The batch below has no (a1,y1) sample:
#   (a0,y0): z = 1, 3 -> 2 ; (a0,y1): z = 5 -> 5 ; (a1,y0): z = 4 -> 4 ; (a1,y1): empty.
Z_E = [1.0, 3.0, 5.0, 4.0]
Y_E = [0, 0, 1, 0]
A_E = [0, 0, 0, 1]


@pytest.mark.parametrize(
    "form,zero,skip",
    [
        ("eopp", 5.0, 0.0),  # zero-fill: |5 - 0|; skip: the only term is dropped
        ("eodds_abs", 5.0 + 2.0, 2.0),  # |5 - 0| + |2 - 4| ; skip keeps |2 - 4|
        ("eodds_sum", 0.5 * abs(-2 + 5), 0.5 * 2.0),  # ½|(2-4) + (5-0)| ; skip: ½|2-4|
        ("eodds_avgodds", 0.5 * (5 + 2), 0.5 * 2),
        ("spd", abs(3 - 4), abs(3 - 4)),  # both groups present: m0 = 9/3, m1 = 4
    ],
)
def test_empty_cell_zero_vs_skip(form, zero, skip):
    for empty, expect in (("zero", zero), ("skip", skip)):
        z = _t(Z_E, grad=True)
        out = bias_loss(z, _t(Y_E), _t(A_E), space="logit", form=form, empty=empty)
        assert out.item() == pytest.approx(expect, abs=1e-12), empty
        out.backward()
        assert torch.isfinite(z.grad).all()


def test_empty_cell_zero_fill_gradient_by_hand():
    # eodds_abs zero-fill = |m01 - 0| + |m00 - m10| = 5 + 2; the zero constant carries no gradient.
    z = _t(Z_E, grad=True)
    bias_loss(z, _t(Y_E), _t(A_E), space="logit", form="eodds_abs").backward()
    assert z.grad.tolist() == pytest.approx([-0.5, -0.5, 1.0, 1.0])


def test_spd_skip_with_one_group():
    z = _t([1.0, 2.0, 3.0], grad=True)
    y, a = _t([0, 1, 1]), _t([1, 1, 1])
    # zero-fill: m0 is the constant 0, m1 = 2 -> |0 - 2|
    assert bias_loss(z, y, a, space="logit", form="spd", empty="zero").item() == pytest.approx(2.0)
    assert bias_loss(z, y, a, space="logit", form="spd", empty="skip").item() == 0.0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_all_terms_constant_backward_works(form, space, empty):
    # Every cell empty (B = 0), or every term constant: a tensor attached to the graph, value 0, zero gradient.
    z0 = torch.zeros(0, requires_grad=True)
    out = bias_loss(z0, torch.zeros(0), torch.zeros(0), space=space, form=form, empty=empty)
    assert isinstance(out, torch.Tensor) and out.requires_grad and out.item() == 0.0
    out.backward()
    # One group only under skip: every term is dropped.
    z = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    out = bias_loss(z, torch.tensor([0, 1, 1]), torch.tensor([1, 1, 1]), space=space, form=form, empty="skip")
    assert out.requires_grad and out.item() == 0.0
    out.backward()
    assert torch.equal(z.grad, torch.zeros(3))


@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_eopp_no_positives_is_zero_with_zero_grad(empty):
    z = torch.tensor([0.5, -0.5, 1.0], requires_grad=True)
    out = bias_loss(z, torch.zeros(3), torch.tensor([0, 1, 1]), form="eopp", empty=empty)
    assert out.requires_grad and out.item() == 0.0
    out.backward()
    assert torch.equal(z.grad, torch.zeros(3))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("space", SPACES)
def test_stable_for_large_logits(form, space):
    z = torch.tensor([100.0, -100.0, 100.0, -100.0, 50.0, -80.0], requires_grad=True)
    y, a = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([0, 1, 0, 1, 0, 1])
    out = bias_loss(z, y, a, space=space, form=form)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    if space == "log" and form == "eopp":
        # log σ(100) ≈ 0 and log σ(-100) ≈ -100: m01 = (0 + log σ(50)) / 2 ≈ 0, m11 = -100.
        assert out.item() == pytest.approx(100.0, rel=1e-6)


def test_half_precision_logits():
    z32 = torch.tensor(Z, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        out = bias_loss(z32.to(dt), torch.tensor(Y), torch.tensor(A), space="logit", form="eodds_abs")
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(HAND_LOGIT["eodds_abs"])


def test_input_validation():
    z, y, a = _t(Z), _t(Y), _t(A)
    with pytest.raises(ValueError, match="y must contain only 0 and 1"):
        bias_loss(z, _t([0, 2, 1, 0, 1, 1]), a)
    with pytest.raises(ValueError, match="a must contain only 0 and 1"):
        bias_loss(z, y, _t([0, 0, 0, 1, 1, 3]))
    with pytest.raises(ValueError, match="a has 5 entries but the logits have 6"):
        bias_loss(z, y, a[:5])
    with pytest.raises(ValueError, match=r"z must have shape \(B,\) or \(B, 1\)"):
        bias_loss(z.view(3, 2), y, a)
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        bias_loss(torch.tensor(Y), y, a)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        bias_loss(z, Y, a)
    with pytest.raises(ValueError, match="form must be one of"):
        bias_loss(z, y, a, form="eodds")
    with pytest.raises(ValueError, match="y must contain only 0 and 1"):
        wbce(z, _t([0, 0.5, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="empty"):
        wbce(torch.zeros(0), torch.zeros(0))


def _numpy_bias(z, y, a, space, form, empty):
    """Transcription of docs/algorithm.md §2 with explicit cell loops (float64 numpy)."""
    if space == "logit":
        v = z
    elif space == "prob":
        v = 1 / (1 + np.exp(-z))
    else:
        v = -np.logaddexp(0.0, -z)

    def mean(mask):
        return (v[mask].mean(), True) if mask.any() else (0.0, False)

    def gap(g0, g1):
        (m0, p0), (m1, p1) = mean(g0), mean(g1)
        return 0.0 if (empty == "skip" and not (p0 and p1)) else m0 - m1

    if form == "spd":
        return abs(gap(a == 0, a == 1))
    tpr = gap((a == 0) & (y == 1), (a == 1) & (y == 1))
    fpr = gap((a == 0) & (y == 0), (a == 1) & (y == 0))
    return {
        "eopp": abs(tpr),
        "eodds_abs": abs(tpr) + abs(fpr),
        "eodds_sum": 0.5 * abs(fpr + tpr),
        "eodds_avgodds": 0.5 * (abs(tpr) + abs(fpr)),
    }[form]


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-30, 30, allow_nan=False), st.integers(0, 1), st.integers(0, 1)), min_size=0, max_size=12
    ),
    space=st.sampled_from(SPACES),
    form=st.sampled_from(FORMS),
    empty=st.sampled_from(["zero", "skip"]),
)
def test_bias_matches_numpy_transcription(data, space, form, empty):
    z = np.array([d[0] for d in data], dtype=np.float64)
    y = np.array([d[1] for d in data])
    a = np.array([d[2] for d in data])
    zt = torch.tensor(z, requires_grad=True)
    out = bias_loss(zt, torch.tensor(y), torch.tensor(a), space=space, form=form, empty=empty)
    assert out.item() == pytest.approx(_numpy_bias(z, y, a, space, form, empty), abs=1e-9)
    out.backward()
    assert torch.isfinite(zt.grad).all()


def _wbce_algebraic(z, y):
    """Spec §2: L = (1/B) Σ −[(n_n/B)·y·log p + (n_p/B)·(1−y)·log(1−p)] (the 1e-10 in n_p is negligible)."""
    b = len(z)
    n_p, n_n = y.sum(), (1 - y).sum()
    log_p = -np.logaddexp(0.0, -z)
    log_1mp = -np.logaddexp(0.0, z)
    return float(np.mean(-((n_n / b) * y * log_p + (n_p / b) * (1 - y) * log_1mp)))


def test_wbce_hand_value():
    # B = 4, one positive: n_p = 1, n_n = 3. z = 0 everywhere -> log p = log(1-p) = -log 2.
    # L = (1/4)·[ (3/4)·log 2 + 3·(1/4)·log 2 ] = (3/8)·log 2.
    out = wbce(torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert out.item() == pytest.approx(3 / 8 * math.log(2), rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_wbce_matches_algebraic_form(seed):
    rng = np.random.default_rng(seed)
    b = int(rng.integers(2, 40))
    z = rng.normal(scale=3.0, size=b)
    y = rng.integers(0, 2, size=b).astype(np.float64)
    zt = torch.tensor(z, requires_grad=True)
    out = wbce(zt, torch.tensor(y))
    assert out.item() == pytest.approx(_wbce_algebraic(z, y), rel=1e-8, abs=1e-12)
    # gradient of the algebraic form: (1/B)·[−(n_n/B)·y·(1−p) + (n_p/B)·(1−y)·p]
    out.backward()
    p = 1 / (1 + np.exp(-z))
    n_p, n_n = y.sum(), (1 - y).sum()
    grad = (-(n_n / b) * y * (1 - p) + (n_p / b) * (1 - y) * p) / b
    np.testing.assert_allclose(zt.grad.numpy(), grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_wbce_single_class_batch_is_about_zero(label):
    z = torch.tensor([3.0, -2.0, 0.5, 100.0, -100.0], requires_grad=True)
    out = wbce(z, torch.full((5,), label))
    out.backward()
    assert torch.isfinite(out) and 0.0 <= out.item() < 1e-7
    assert torch.isfinite(z.grad).all()


def test_combined_loss():
    z, y, a = _t(Z), _t(Y), _t(A)
    w = _wbce_algebraic(np.array(Z), np.array(Y, dtype=np.float64))
    b = HAND_LOGIT["eodds_sum"]
    assert combined_loss(z, y, a, wbce_weight=1.0, bias_weight=0.1, bias=BMFT_BIAS).item() == pytest.approx(
        w + 0.1 * b, rel=1e-9
    )
    assert combined_loss(z, y, a, wbce_weight=0.0, bias_weight=1.0, bias=BMFT_BIAS).item() == pytest.approx(b)
    assert combined_loss(z, y, a, wbce_weight=0.3, bias_weight=0.0).item() == pytest.approx(0.3 * w, rel=1e-9)
    with pytest.raises(ValueError, match="both 0"):
        combined_loss(z, y, a, wbce_weight=0.0, bias_weight=0.0)
