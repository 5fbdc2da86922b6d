"""Fisher importances (docs/algorithm.md §3): the one-forward pass equals the reference two-pass loop, and both equal
the batch-mean gradient squared derived by hand on a linear model."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.fairness.losses import BMFT_BIAS, SWIFT_BIAS, BiasSpec
from fastmask.masking.importance import fisher_importance, fisher_importance_two_pass


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 1),
    )


def data(n: int = 37, seed: int = 1, c: int = 3, hw: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    y = (torch.rand(n, generator=g) > 0.4).float()
    a = (torch.rand(n, generator=g) > 0.5).long()
    return TensorDataset(x, y, a)


@pytest.mark.parametrize("bias", [SWIFT_BIAS, BMFT_BIAS, BiasSpec("prob", "eopp")], ids=["swift", "bmft", "paper"])
def test_one_forward_equals_two_pass(bias):
    model = tiny_cnn()
    # BN running statistics that are not the init values, so eval mode matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    loader = DataLoader(data(), batch_size=8, shuffle=False)  # 5 batches, the last one partial (5 samples)
    ib, il, nb = fisher_importance(model, loader, bias=bias)
    rb, rl, rnb = fisher_importance_two_pass(model, loader, bias=bias)
    assert nb == rnb == 5
    assert list(ib) == [n for n, _ in model.named_parameters()]  # every parameter, head and BN included
    for name in rb:
        torch.testing.assert_close(ib[name], rb[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(il[name], rl[name], rtol=1e-5, atol=0)
    assert all(float(t.sum()) > 0 for t in ib.values())
    assert all(float(t.sum()) > 0 for t in il.values())


def test_bias_spec_space_changes_importance():
    model = tiny_cnn()
    loader = DataLoader(data(), batch_size=8)
    ib_log, il_a, _ = fisher_importance(model, loader, bias=SWIFT_BIAS)
    ib_logit, il_b, _ = fisher_importance(model, loader, bias=BMFT_BIAS)
    for n in il_a:
        torch.testing.assert_close(il_a[n], il_b[n])  # the WBCE importance does not depend on the bias spec
    assert not torch.allclose(ib_log["9.weight"], ib_logit["9.weight"])


# ---- hand derivation on z = w·x + b ---------------------------------------------------------------------------------

def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _dwbce_dz(z, y):
    """From docs/algorithm.md §2: L = (1/B) Σ −[(n_n/B) y log p + (n_p/B)(1−y) log(1−p)], d log p/dz = 1−p, d
    log(1−p)/dz = −p."""
    b = len(z)
    p = _sigmoid(z)
    n_p, n_n = y.sum(), (1 - y).sum()
    return (-(n_n / b) * y * (1 - p) + (n_p / b) * (1 - y) * p) / b


def _cell_weights(y, a, g, c):
    """d m_{g,c}(v) / d v_i = 1[a_i=g, y_i=c] / n_{g,c}."""
    sel = (a == g) & (y == c)
    return sel / sel.sum()


def _dbias_dz(z, y, a, space, form):
    p = _sigmoid(z)
    v = {"logit": z, "prob": p, "log": np.log(p)}[space]
    dv = {"logit": np.ones_like(z), "prob": p * (1 - p), "log": 1 - p}[space]
    d_tpr = _cell_weights(y, a, 0, 1) - _cell_weights(y, a, 1, 1)  # gradient of m01 − m11 w.r.t. v
    d_fpr = _cell_weights(y, a, 0, 0) - _cell_weights(y, a, 1, 0)
    tpr, fpr = d_tpr @ v, d_fpr @ v
    if form == "eopp":  # |m01 − m11|
        dv_b = np.sign(tpr) * d_tpr
    elif form == "eodds_sum":  # ½|(m00 − m10) + (m01 − m11)|
        dv_b = 0.5 * np.sign(tpr + fpr) * (d_tpr + d_fpr)
    else:  # eodds_abs: |m01 − m11| + |m00 − m10|
        dv_b = np.sign(tpr) * d_tpr + np.sign(fpr) * d_fpr
    return dv_b * dv


@pytest.mark.parametrize("space,form", [("logit", "eodds_sum"), ("prob", "eopp"), ("log", "eodds_abs")])
def test_linear_model_equals_hand_derived_batch_mean_gradient_squared(space, form):
    x = np.array([[0.5, -1.0], [1.5, 0.25], [-0.5, 2.0], [1.0, 1.0], [0.2, -0.3], [-1.2, 0.7],
                  [0.8, 0.1], [-0.4, -0.9], [2.0, -0.5], [0.3, 0.6], [-0.7, 1.1], [1.1, -1.4]])
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=float)
    a = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    w, b = np.array([0.3, -0.2]), 0.1
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(w[None]))
        model[1].bias.fill_(b)
    ds = TensorDataset(torch.tensor(x, dtype=torch.float32).view(-1, 2, 1, 1), torch.tensor(y, dtype=torch.float32),
                       torch.tensor(a))
    loader = DataLoader(ds, batch_size=6)  # two batches, each holding every (a, y) cell

    exp = {"b_w": 0, "b_b": 0, "l_w": 0, "l_b": 0}
    for sl in (slice(0, 6), slice(6, 12)):
        xb, yb, ab = x[sl], y[sl], a[sl]
        z = xb @ w + b
        d_b = _dbias_dz(z, yb, ab, space, form)  # dJ/dz_i; dz_i/dw = x_i, dz_i/db = 1
        d_l = _dwbce_dz(z, yb)
        exp["b_w"] = exp["b_w"] + (d_b @ xb) ** 2 / 2
        exp["b_b"] = exp["b_b"] + d_b.sum() ** 2 / 2
        exp["l_w"] = exp["l_w"] + (d_l @ xb) ** 2 / 2
        exp["l_b"] = exp["l_b"] + d_l.sum() ** 2 / 2

    ib, il, nb = fisher_importance(model, loader, bias=BiasSpec(space, form))
    assert nb == 2
    t = lambda v: torch.tensor(np.atleast_1d(v), dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(ib["1.weight"], t(exp["b_w"]).view(1, 2), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ib["1.bias"], t(exp["b_b"]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(il["1.weight"], t(exp["l_w"]).view(1, 2), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(il["1.bias"], t(exp["l_b"]), rtol=1e-5, atol=1e-9)


def test_eval_mode_grads_untouched_and_state_restored():
    model = tiny_cnn()
    model.train()
    model[0].weight.requires_grad_(False)  # a frozen parameter still gets an importance, and stays frozen
    loader = DataLoader(data(), batch_size=8)
    ib1, _, _ = fisher_importance(model, loader)
    ib2, _, _ = fisher_importance(model, loader)
    for n in ib1:  # eval mode: dropout off, BN running stats used and not updated, so the pass is deterministic
        torch.testing.assert_close(ib1[n], ib2[n], rtol=0, atol=0)
    assert float(ib1["0.weight"].sum()) > 0
    assert model.training and not model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())  # nothing accumulates in .grad (docs/algorithm.md §8.8)
    assert torch.equal(model[1].running_mean, torch.zeros(4))


def test_errors():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="no batches"):
        fisher_importance(model, [])
    with pytest.raises(ValueError, match=r"tuple \(x, y, a"):
        fisher_importance(model, [(torch.zeros(2, 3, 6, 6), torch.zeros(2))])
