"""Masks (docs/algorithm.md §4): a faithful SWiFT soft mask and BMFT hard mask on a tiny model, against values derived
by hand; the percentile-rate semantics, random and manual masks, and safetensors storage."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.fairness.losses import BMFT_BIAS, SWIFT_BIAS
from fastmask.masking.importance import fisher_importance
from fastmask.masking.masks import (
    bmft_mask,
    fraction_mask,
    importance_ratio,
    load_masks,
    manual_mask,
    mask_fraction,
    random_mask,
    save_masks,
    swift_mask,
)
from fastmask.model.head import split_head
from fastmask.optim import MaskedSGD


class Scale(nn.Module):
    """E: h = s ⊙ x."""

    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) * self.s


def scale_linear_model(s, w, b):
    model = nn.Sequential(Scale(s), nn.Linear(len(w), 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([w]))
        model[1].bias.fill_(b)
    return model


X = np.array([[1.0, 0.5, -1.0], [0.2, -1.5, 0.8], [-0.6, 0.4, 1.2], [1.4, 1.0, 0.3], [0.7, -0.2, -0.9]])
Y = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
A = np.array([0, 0, 1, 1, 1])
S, W, B = [0.9, -0.4, 1.3], [0.5, 0.8, -0.6], 0.2


def hand_gradients(space_form):
    """dJ/dθ for one batch of z = Σ_k w_k s_k x_k + b, derived from docs/algorithm.md §2 by hand.

    WBCE: dL/dz_i = (1/B)[−(n_n/B) y_i (1−p_i) + (n_p/B)(1−y_i) p_i].
    SWiFT (log p, Eqs. 2-4): B = |m01 − m11| + |m00 − m10| of v = log p, dv/dz = 1 − p.
    BMFT code eodds on logits: B = ½|(m00 − m10) + (m01 − m11)| of v = z.
    Chain rule: dz/ds_k = w_k x_k, dz/dw_k = s_k x_k, dz/db = 1.
    """
    s, w = np.array(S), np.array(W)
    z = X @ (s * w) + B
    p = 1 / (1 + np.exp(-z))
    n = len(z)
    n_p, n_n = Y.sum(), (1 - Y).sum()
    d_l = (-(n_n / n) * Y * (1 - p) + (n_p / n) * (1 - Y) * p) / n
    cell = lambda g, c: ((A == g) & (Y == c)) / ((A == g) & (Y == c)).sum()  # noqa: E731
    d_tpr, d_fpr = cell(0, 1) - cell(1, 1), cell(0, 0) - cell(1, 0)
    if space_form == "swift":
        v, dv = np.log(p), 1 - p
        d_b = (np.sign(d_tpr @ v) * d_tpr + np.sign(d_fpr @ v) * d_fpr) * dv
    else:
        v = z
        d_b = 0.5 * np.sign((d_tpr + d_fpr) @ v) * (d_tpr + d_fpr)
    grads = {}
    for tag, d in (("b", d_b), ("l", d_l)):
        grads[tag] = {"0.s": (d @ X) * w, "1.weight": (d @ X) * s, "1.bias": np.array([d.sum()])}
    return grads


def norm(x):
    """Spec §4, SWiFT normalisation with its guard: raw x when max == min."""
    return x if x.max() == x.min() else (x - x.min()) / (x.max() - x.min() + 1e-10)


def loader():
    ds = TensorDataset(torch.tensor(X, dtype=torch.float32).view(-1, 3, 1, 1), torch.tensor(Y, dtype=torch.float32),
                       torch.tensor(A))
    return DataLoader(ds, batch_size=5)


def test_faithful_swift_soft_mask_hand_computed():
    g = hand_gradients("swift")
    model = scale_linear_model(S, W, B)
    ib, il, _ = fisher_importance(model, loader(), bias=SWIFT_BIAS)
    masks = swift_mask(ib, il)
    for name in ("0.s", "1.weight", "1.bias"):
        i_b, i_l = g["b"][name] ** 2, g["l"][name] ** 2  # one batch: I = g²
        expected = np.tanh(norm(i_b) / (norm(i_l) + 1e-10))
        got = masks[name].reshape(-1).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=name)
    # docs/algorithm.md §4: the element with Norm(I_b) = 0 gets M = 0; the 1-element bias keeps tanh of its raw ratio
    assert masks["0.s"].min() == 0
    raw = g["b"]["1.bias"][0] ** 2 / (g["l"]["1.bias"][0] ** 2 + 1e-10)
    np.testing.assert_allclose(float(masks["1.bias"]), np.tanh(raw), rtol=1e-4)


def test_faithful_bmft_hard_mask_hand_computed():
    g = hand_gradients("bmft")
    model = scale_linear_model(S, W, B)
    _, _, feat = split_head(model)
    ib, il, _ = fisher_importance(model, loader(), bias=BMFT_BIAS)
    masks = bmft_mask(ib, il, feat, rate=50)
    r = norm(g["b"]["0.s"] ** 2) / (norm(g["l"]["0.s"] ** 2) + 1e-10)
    alpha = np.median(r)  # rate 50 over the 3 feature elements = the middle one
    np.testing.assert_array_equal(masks["0.s"].numpy(), r > alpha)
    assert masks["0.s"].sum() == 1  # strict >: only the largest of three is above the median
    assert masks["0.s"].dtype == torch.bool
    assert not masks["1.weight"].any() and not masks["1.bias"].any()  # head mask is 0


def random_importances(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (8, 3, 3, 3), "bn.weight": (8,), "bn.bias": (8,), "fc.weight": (1, 8), "fc.bias": (1,)}
    ib = {n: torch.rand(s, generator=g) ** 3 for n, s in shapes.items()}
    il = {n: torch.rand(s, generator=g) ** 3 for n, s in shapes.items()}
    return ib, il


@pytest.mark.parametrize("rate", [50, 70, 90, 95])
def test_hard_mask_rate_is_a_percentile_rate(rate):
    ib, il = random_importances()
    feat = ["conv.weight", "bn.weight", "bn.bias"]
    masks = bmft_mask(ib, il, feat, rate=rate)
    r = importance_ratio(ib, il)
    flat = np.concatenate([r[n].reshape(-1).numpy() for n in feat])
    alpha = np.percentile(flat, rate)
    for n in feat:
        np.testing.assert_array_equal(masks[n].numpy(), r[n].numpy() > alpha)
    assert abs(mask_fraction(masks, feat) - (1 - rate / 100)) < 1.5 / flat.size + 1e-9
    assert not masks["fc.weight"].any()
    incl = bmft_mask(ib, il, feat, rate=rate, inclusive=True)
    assert mask_fraction(incl, feat) >= mask_fraction(masks, feat)


def test_overwrite_writes_the_same_masks_into_imp_bias():
    """overwrite=True (what the pipeline uses) returns I_b's own tensors holding what overwrite=False returns."""
    ib, il = random_importances()
    feat = ["conv.weight", "bn.weight", "bn.bias"]
    for fn, args in ((swift_mask, ()), (importance_ratio, ()), (bmft_mask, (feat,))):
        want = fn(ib, il, *args)
        mine = {n: t.clone() for n, t in ib.items()}
        got = fn(mine, il, *args, overwrite=True)
        for n in ib:
            assert torch.equal(got[n], want[n]), (fn.__name__, n)
            if fn is not bmft_mask:
                assert got[n] is mine[n]
        if fn is bmft_mask:
            assert all(torch.equal(mine[n], r) for n, r in importance_ratio(ib, il).items())  # I_b now holds R


def test_constant_tensor_gives_no_nan():
    # docs/algorithm.md §8.6: BMFT's unguarded normalisation would give NaN here and zero the whole mask
    ib, il = random_importances()
    ib["bn.bias"] = torch.full((8,), 0.25)
    il["bn.bias"] = torch.full((8,), 0.5)
    r = importance_ratio(ib, il)
    assert not any(torch.isnan(t).any() for t in r.values())
    torch.testing.assert_close(r["bn.bias"], torch.full((8,), 0.25 / (0.5 + 1e-10)))
    masks = bmft_mask(ib, il, ["conv.weight", "bn.weight", "bn.bias"])
    assert masks["conv.weight"].any()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_hard_mask_fraction(fraction):
    ib, il = random_importances(1)
    feat = ["conv.weight", "bn.weight", "bn.bias"]
    r = importance_ratio(ib, il)
    masks = fraction_mask(r, fraction, feat)
    flat = np.concatenate([r[n].reshape(-1).numpy() for n in feat])
    q = np.percentile(flat, 100 * (1 - fraction))
    assert abs(mask_fraction(masks, feat) - fraction) < 1.5 / flat.size + 1e-9
    np.testing.assert_array_equal(masks["fc.weight"].numpy(), r["fc.weight"].numpy() > q)  # head: same threshold
    with pytest.raises(ValueError, match="fraction"):
        fraction_mask(r, 1.5, feat)


def test_random_mask_uniform_and_seeded():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Linear(64, 1))
    m1, m2, m3 = random_mask(model, 3), random_mask(model, 3), random_mask(model, 4)
    assert list(m1) == [n for n, _ in model.named_parameters()]
    w = m1["0.weight"]
    assert w.shape == model[0].weight.shape and w.dtype == torch.float32
    assert 0 <= float(w.min()) and float(w.max()) < 1  # uniform [0, 1), not randn (docs/algorithm.md §8.19)
    assert abs(float(w.mean()) - 0.5) < 0.05
    assert torch.equal(m1["0.weight"], m2["0.weight"]) and not torch.equal(m1["0.weight"], m3["0.weight"])


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1)


def test_manual_masks():
    model = ConvNet()
    bn = manual_mask(model, "bn")
    assert {n for n, m in bn.items() if m.all()} == {"b1.weight", "b1.bias", "b2.weight", "b2.bias"}
    assert not any(bn[n].any() for n in ("c1.weight", "c2.weight", "fc.weight", "fc.bias"))
    top = manual_mask(model, "shallow_conv", n_shallow=1)
    assert {n for n, m in top.items() if m.all()} == {"c1.weight", "c1.bias"}
    top2 = manual_mask(model, "shallow_conv", n_shallow=2)
    assert {n for n, m in top2.items() if m.all()} == {"c1.weight", "c1.bias", "c2.weight", "c2.bias"}
    with pytest.raises(ValueError, match="3 but .* has 2 convolution"):
        manual_mask(model, "shallow_conv", n_shallow=3)
    with pytest.raises(ValueError, match="kind"):
        manual_mask(model, "deep")
    with pytest.raises(ValueError, match="no BatchNorm"):
        manual_mask(nn.Sequential(nn.Linear(2, 1)), "bn")


def test_every_builders_masks_are_accepted_by_the_masked_optimizers():
    """set_masks refuses float masks outside [0, 1] or with NaN; fastmask's own masks never are, at the edges either:
    a constant tensor (not normalised), I_l = 0 where I_b > 0 (M = tanh(1e10 R) = 1 exactly), I_b = 0 (M = 0)."""
    ib, il = random_importances(2)
    ib["bn.bias"], il["bn.bias"] = torch.full((8,), 3.0), torch.full((8,), 1e-30)  # constant: the raw ratio, 3e10
    il["conv.weight"].view(-1)[:20] = 0.0
    ib["bn.weight"].view(-1)[:3] = 0.0
    ib["fc.bias"], il["fc.bias"] = torch.tensor([5.0]), torch.tensor([0.0])
    feat = ["conv.weight", "bn.weight", "bn.bias"]
    soft = swift_mask(ib, il)
    assert max(float(m.max()) for m in soft.values()) == 1.0 and min(float(m.min()) for m in soft.values()) == 0.0
    built = {
        "swift": soft,
        "bmft": bmft_mask(ib, il, feat),
        "fraction": fraction_mask(importance_ratio(ib, il), 0.3, feat),
        "random": random_mask({n: torch.zeros(t.shape) for n, t in ib.items()}, 1),
    }
    for name, masks in built.items():
        params = [(n, torch.zeros(m.shape, requires_grad=True)) for n, m in masks.items()]
        opt = MaskedSGD(params, lr=0.1, masks=masks)  # raises, naming the parameter, on a mask it refuses
        assert len(opt.masks()) == len(masks), name
    model = ConvNet()
    MaskedSGD(model.named_parameters(), lr=0.1, masks=manual_mask(model, "bn"))


def test_save_load_roundtrip_and_errors(tmp_path):
    model = ConvNet()
    masks = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    masks["fc.bias"] = torch.tensor([True])
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(masks, path)
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temporary file left behind
    back = load_masks(path, model)
    assert back.keys() == masks.keys()
    for n in masks:
        assert torch.equal(back[n], masks[n])

    other = ConvNet()
    other.c1 = nn.Conv2d(3, 4, 5)
    with pytest.raises(ValueError, match=r"'c1.weight' has shape \(4, 3, 3, 3\) but the parameter has shape"):
        load_masks(path, other)
    partial = {n: m for n, m in masks.items() if n != "b2.bias"}
    save_masks(partial, path)
    with pytest.raises(ValueError, match="no mask for parameter 'b2.bias'"):
        load_masks(path, model)
    assert "b2.bias" not in load_masks(path, model, strict=False)
    save_masks({**masks, "extra.weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="'extra.weight' is not a parameter"):
        load_masks(path, model)
