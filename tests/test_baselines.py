"""The baselines of docs/algorithm.md §9 on tiny models: which parameters move (and which stay bit-identical), which
loss each step minimises (recomputed from the losses' definitions), which data each method reads (balanced D_r,
unbalanced D_e, or none), and the selection / pruning rules against independent oracles (finite differences, a
hand-written Fisher loop, numpy percentiles, sklearn's balanced accuracy)."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
from conftest import linear
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.fairness.losses import SWIFT_BIAS, wbce
from fastmask.masking.importance import fisher_importance_two_pass
from fastmask.masking.masks import random_mask
from fastmask.methods import registry
from fastmask.methods.baselines import ablations as AB
from fastmask.methods.baselines import bias_proxy as BP
from fastmask.methods.baselines import fairprune as FP
from fastmask.methods.baselines import finetune as FT
from fastmask.methods.configs import BmftConfig, StepConfig, SwiftConfig
from fastmask.methods.state import Result
from fastmask.methods.swift import swift

pytestmark = pytest.mark.usefixtures("one_thread")


def cnn(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU twice, pooling, and a dropout + linear head (modules 0..9; head = module 9). The convolutions have
    no bias: a bias before BatchNorm gets no gradient in train mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 1),
    )


def biased_cnn(seed: int = 0) -> nn.Module:
    """:func:`cnn` trained on data whose attribute agrees with the label 90 % of the time and shifts the input, so
    it reads the attribute: on attribute-independent data its predictions are biased."""
    g = torch.Generator().manual_seed(100 + seed)
    y = (torch.arange(128) % 2).float()
    a = torch.where(torch.rand(128, generator=g) < 0.9, y, 1 - y)
    x = torch.randn(128, 3, 4, 4, generator=g) + 0.7 * y.view(-1, 1, 1, 1) + 1.5 * a.view(-1, 1, 1, 1)
    model = cnn(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        wbce(model(x), y).backward()
        opt.step()
    return model.eval()


def dataset(n: int = 48, seed: int = 1, hw: int = 2) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    a = ((torch.arange(n) // 2) % 2).long()
    # the attribute leaks into the input, so the models are biased
    x = torch.randn(n, 3, hw, hw, generator=g) + y.view(-1, 1, 1, 1) + 0.8 * a.view(-1, 1, 1, 1)
    return TensorDataset(x, y, a)


class Loader:
    """A fixed list of batches that counts how often it is iterated; ``on_iter`` is called at each iteration."""

    def __init__(self, ds, batch_size=16, on_iter=None):
        self.batches = list(DataLoader(ds, batch_size=batch_size))
        self.passes = 0
        self.on_iter = on_iter

    def __iter__(self):
        self.passes += 1
        if self.on_iter is not None:
            self.on_iter()
        return iter(self.batches)


def plain(epochs, lr=0.1):
    """SGD without momentum or weight decay: a parameter without gradient stays bit-identical."""
    return StepConfig(epochs, lr, "sgd", momentum=0.0, weight_decay=0.0)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def params_of(model, *modules):
    return {f"{m}.{n}" for m in modules for n, _ in model[m].named_parameters()}


CNN_PARAMS = params_of(cnn(), 0, 1, 3, 4, 9)
CNN_HEAD = {"9.weight", "9.bias"}


def mean_loss(model, batches, fn):
    with torch.no_grad():
        return sum(float(fn(model(x), y, a)) for x, y, a in batches) / len(batches)


# ---- Baseline, FullFT ----------------------------------------------------------------------------------------------


def test_baseline_reads_nothing_and_changes_nothing():
    model = cnn()
    before = state(model)
    ext, bal = Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4))
    res = FT.baseline(model, ext, bal)
    assert changed(before, model) == set() and ext.passes == bal.passes == 0
    assert res.method == "baseline" and res.history == []


@pytest.mark.parametrize("method, data, weights", [
    ("fullft-rw", "balanced", (1.0, 0.0)),
    ("fullft-reg", "external", (0.3, 0.7)),
    ("fullft-fdr", "balanced", (0.3, 0.7)),
])
def test_fullft_data_and_loss(method, data, weights):
    """FullFT-RW: WBCE on D_r; FullFT-Reg: β·WBCE + (1 − β)·B on D_e; FullFT-FDR: the same loss on D_r
    (docs/algorithm.md §9)."""
    ext, bal = Loader(dataset(32, 5)), Loader(dataset(48, 6))
    model = linear()
    ref = copy.deepcopy(model)
    res = registry.METHODS[method](model, ext, bal, config=FT.FullFTConfig(step=plain(1, lr=0.0), beta=0.3))
    used, unused = (bal, ext) if data == "balanced" else (ext, bal)
    assert used.passes == 3 and unused.passes == 0  # the guard's original score, one epoch, the guard's check
    w_l, w_b = weights
    expected = mean_loss(ref, used.batches, lambda z, y, a: w_l * wbce(z, y) + w_b * SWIFT_BIAS(z, y, a))
    assert res.history[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert [(c["step"], c["data"]) for c in res.checks] == [("original", data), (method, data)]


@pytest.mark.parametrize("method", ["fullft-rw", "fullft-reg", "fullft-fdr"])
def test_fullft_moves_every_parameter(method):
    model = cnn()
    before = state(model)
    registry.METHODS[method](model, Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4)),
                      config=FT.FullFTConfig(step=plain(2, lr=0.05)))
    assert CNN_PARAMS <= changed(before, model)
    assert all(p.requires_grad for p in model.parameters())


# ---- LLFT ----------------------------------------------------------------------------------------------------------


def test_llft_trains_only_the_head_on_balanced_data_with_e_in_eval_mode():
    ext, bal = Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4))
    model = cnn()
    before = state(model)
    res = FT.llft(model, ext, bal, config=FT.LLFTConfig(step=StepConfig(2, 0.1, "sgd", 0.9, 5e-4), reinit="zero"))
    # E's weights and BatchNorm statistics bit-identical (E frozen and in eval mode); only the head moved
    assert changed(before, model) == CNN_HEAD
    assert ext.passes == 0 and bal.passes == 1 + 3  # the guard's original score, two epochs, the guard's check
    assert res.head_reset_fraction == 1.0


def test_llft_loss_and_reinit():
    bal = Loader(dataset(48, 6))
    model = linear()
    ref = copy.deepcopy(model)
    res = FT.llft(model, Loader(dataset(32, 5)), bal,
                 config=FT.LLFTConfig(step=plain(1, lr=0.0), beta=0.4, reinit="none"))
    expected = mean_loss(ref, bal.batches, lambda z, y, a: wbce(z, y) + 0.4 * SWIFT_BIAS(z, y, a))
    assert res.history[0]["loss"] == pytest.approx(expected, rel=1e-6)

    model = linear()
    FT.llft(model, bal, bal, config=FT.LLFTConfig(step=plain(0), reinit="zero"))
    assert torch.count_nonzero(model[3].weight) == 0 and torch.count_nonzero(model[3].bias) == 0

    # "reset": the head is drawn afresh from the seeded RNG, as a new nn.Linear built after torch.manual_seed(seed)
    model = linear()
    FT.llft(model, bal, bal, config=FT.LLFTConfig(step=plain(0), reinit="reset", seed=7))
    torch.manual_seed(7)
    fresh = nn.Linear(4, 1)
    assert torch.equal(model[3].weight, fresh.weight) and torch.equal(model[3].bias, fresh.bias)
    assert not torch.equal(model[1].weight, fresh.weight[:, :1])  # E kept (sanity: shapes differ anyway)
    assert torch.equal(model[1].weight, linear()[1].weight)


# ---- the signed proxy ----------------------------------------------------------------------------------------------


def test_signed_proxy_hand_values():
    p = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7, 0.1, 0.8, 0.3], dtype=torch.float64)
    z = torch.log(p / (1 - p)).requires_grad_(True)
    y = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1])
    a = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    # cells: (a0,y1) {0.9, 0.6}, (a0,y0) {0.2}, (a1,y1) {0.7, 0.8, 0.3}, (a1,y0) {0.4, 0.1}
    m01, m00, m11, m10 = 0.75, 0.2, 0.6, 0.25
    spd = (0.9 + 0.2 + 0.6) / 3 - (0.4 + 0.7 + 0.1 + 0.8 + 0.3) / 5
    with torch.no_grad():
        assert float(BP.signed_proxy(z, y, a, "spd")) == pytest.approx(spd, abs=1e-12)
        assert float(BP.signed_proxy(z, y, a, "eod")) == pytest.approx(m01 - m11, abs=1e-12)
        assert float(BP.signed_proxy(z, y, a, "eodds")) == pytest.approx(0.5 * ((m00 - m10) + (m01 - m11)), abs=1e-12)
        assert float(BP.signed_proxy(z, y, 1 - a, "spd")) == pytest.approx(-spd, abs=1e-12)  # signed, not |.|
    # an empty cell is the constant 0, and the result stays attached to the graph
    out = BP.signed_proxy(z, y, torch.zeros_like(a), "eod")
    assert float(out.detach()) == pytest.approx((0.9 + 0.6 + 0.7 + 0.8 + 0.3) / 5)
    out.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="metric"):
        BP.signed_proxy(z, y, a, "eopp")


def val_measures(model, ds, metric="eodds"):
    """Independent of the implementation: signed bias of ŷ = 1[p > 0.5] and sklearn's balanced accuracy."""
    x, y, a = ds.tensors
    model.eval()
    with torch.no_grad():
        yhat = (torch.sigmoid(model(x).reshape(-1)) > 0.5).numpy().astype(float)
    y, a = y.numpy().astype(int), a.numpy()

    def rate(sel):
        return yhat[sel].mean() if sel.any() else 0.0

    tpr = rate((a == 0) & (y == 1)) - rate((a == 1) & (y == 1))
    fpr = rate((a == 0) & (y == 0)) - rate((a == 1) & (y == 0))
    bias = {"eodds": 0.5 * (tpr + fpr), "eod": tpr, "spd": rate(a == 0) - rate(a == 1)}[metric]
    return bias, balanced_accuracy_score(y, yhat)


def expected_selection(trajectory, floor):
    ok = [t for t in trajectory if t["balanced_accuracy"] >= floor]
    return min(ok, key=lambda t: abs(t["bias"]))["index"] if ok else None  # min keeps the first of equals


# ---- DiffGda -------------------------------------------------------------------------------------------------------


def test_diffgda_loss_is_the_signed_proxy_with_the_initial_bias_sign_on_external_data():
    ds_ext = dataset(32, 5)
    ext, bal = Loader(ds_ext), Loader(dataset(48, 6))
    model = linear()
    ref = copy.deepcopy(model)
    bias0, _ = val_measures(copy.deepcopy(model), ds_ext)
    assert bias0 != 0
    sign = math.copysign(1.0, bias0)
    res = BP.diffgda(model, ext, bal, config=BP.DiffGdaConfig(step=StepConfig(2, 0.0, "adam", 0.0, 0.0)))
    assert bal.passes == 0
    expected = mean_loss(ref, ext.batches, lambda z, y, a: sign * BP.signed_proxy(z, y, a, "eodds"))
    assert [h["loss"] for h in res.history] == pytest.approx([expected, expected], rel=1e-6)
    assert res.details["sign"] == sign
    # data="balanced" trains on D_r (validation stays on D_e)
    ext, bal = Loader(ds_ext), Loader(dataset(48, 6))
    BP.diffgda(linear(), ext, bal, config=BP.DiffGdaConfig(step=StepConfig(2, 0.0, "adam", 0.0, 0.0), data="balanced"))
    # the guard's original score, two epochs and the guard's check; initial evaluation + one per epoch
    assert bal.passes == 1 + 3 and ext.passes == 1 + 2


def test_diffgda_moves_all_parameters_and_keeps_the_least_biased_checkpoint_above_the_floor():
    ds_ext, ds_val = dataset(48, 5, hw=4), dataset(64, 9, hw=4)
    model = biased_cnn()
    snapshots = []
    val = Loader(ds_val, on_iter=lambda: snapshots.append(state(model)))
    res = BP.diffgda(model, Loader(ds_ext), Loader(dataset(32, 6, hw=4)), val_loader=val,
                    config=BP.DiffGdaConfig(step=StepConfig(6, 1e-2, "adam", 0.0, 0.0), max_drop=0.2))
    traj = res.details["trajectory"]
    assert [t["index"] for t in traj] == list(range(7)) and len(snapshots) == 7
    # every parameter moved during the first epoch (all parameters are trained)
    assert {k for k in CNN_PARAMS if not torch.equal(snapshots[0][k], snapshots[1][k])} == CNN_PARAMS
    # the trajectory holds the model's real validation figures at each checkpoint
    for t, snap in zip(traj, snapshots, strict=True):
        m = cnn()
        m.load_state_dict(snap)
        bias, perf = val_measures(m, ds_val)
        assert t["bias"] == pytest.approx(bias) and t["balanced_accuracy"] == pytest.approx(perf)
    assert res.details["performance_floor"] == pytest.approx(traj[0]["balanced_accuracy"] - 0.2)
    sel = expected_selection(traj, res.details["performance_floor"])
    assert res.details["selected_epoch"] == sel
    assert changed(snapshots[sel], model) == set()  # the model holds the selected checkpoint
    assert any(abs(t["bias"]) < abs(traj[0]["bias"]) for t in traj[1:])  # it did reduce the bias somewhere


def test_diffgda_keeps_the_unchanged_model_when_no_checkpoint_meets_the_floor(caplog):
    model = cnn()
    before = state(model)
    with caplog.at_level(logging.WARNING, logger="fastmask.methods.baselines.bias_proxy"):
        res = BP.diffgda(model, Loader(dataset(48, 5, hw=4)), Loader(dataset(32, 6, hw=4)),
                        config=BP.DiffGdaConfig(step=StepConfig(2, 3e-2, "adam", 0.0, 0.0), min_performance=1.01))
    assert changed(before, model) == set()
    assert res.details["selected_epoch"] is None and "no candidate" in caplog.text


# ---- DiffPrune -----------------------------------------------------------------------------------------------------


def fd_saliency(model, batches, sign, layer_idx, eps=1e-6):
    """s·Σ a·∂μ/∂a for every channel of BatchNorm ``layer_idx``, by central differences: scaling a channel's BN weight
    and bias by t scales its output by t, so d/dt μ at t = 1 is Σ a·∂μ/∂a. float64, eval mode."""
    model = copy.deepcopy(model).double().eval()
    bn = model[layer_idx]
    out = []
    for c in range(bn.num_features):
        vals = []
        for t in (1 + eps, 1 - eps):
            m = copy.deepcopy(model)
            with torch.no_grad():
                m[layer_idx].weight[c] *= t
                m[layer_idx].bias[c] *= t
                vals.append(np.mean([float(BP.signed_proxy(m(x.double()), y, a, "eodds")) for x, y, a in batches]))
        out.append(sign * (vals[0] - vals[1]) / (2 * eps))
    return out


def test_diffprune_prunes_by_activation_times_gradient_and_changes_only_pruned_channels():
    ds_ext = dataset(48, 5, hw=4)
    ext = Loader(ds_ext)
    model = biased_cnn(3).double()
    for b in ext.batches:
        b[0] = b[0].double()
    before = state(model)
    bias0, _ = val_measures(copy.deepcopy(model), TensorDataset(ds_ext.tensors[0].double(), *ds_ext.tensors[1:]))
    sign = math.copysign(1.0, bias0)
    sal = fd_saliency(model, ext.batches, sign, 1) + fd_saliency(model, ext.batches, sign, 4)
    units = [("1", c) for c in range(4)] + [("4", c) for c in range(4)]
    static_order = [units[i] for i in np.argsort(-np.array(sal), kind="stable")]

    bal = Loader(dataset(32, 6, hw=4))
    res = BP.diffprune(model, ext, bal, config=BP.DiffPruneConfig(units_per_step=1, max_steps=3, dynamic=False,
                                                                 min_performance=-1.0))
    assert bal.passes == 0
    assert [tuple(u) for u in res.details["pruning_order"]] == static_order[:3]

    # only the kept pruned channels changed, to exactly 0; everything else (convs, head, BN statistics) is identical
    kept = res.details["pruned_units"]
    expected = copy.deepcopy(before)
    for layer, c in kept:
        expected[f"{layer}.weight"][c] = 0
        expected[f"{layer}.bias"][c] = 0
    assert changed(expected, model) == set()
    for name, m in res.masks.items():
        layer, kind = name.split(".")
        want = torch.ones_like(m)
        for lay, c in kept:
            if lay == layer:
                want[c] = False
        assert torch.equal(m, want), name
    # selection: the least biased step (step 0 = unpruned) with balanced accuracy >= the floor (here any)
    traj = res.details["trajectory"]
    assert res.details["selected_step"] == expected_selection(traj, -1.0) == len(kept)


def test_diffprune_dynamic_recomputes_saliency_after_each_step():
    ds_ext = dataset(48, 5, hw=4)
    ext = Loader(ds_ext)
    model = biased_cnn(3)
    res = BP.diffprune(copy.deepcopy(model), ext, Loader(ds_ext),
                      config=BP.DiffPruneConfig(units_per_step=1, max_steps=2, dynamic=True, min_performance=-1.0))
    (l1, c1), (l2, c2) = res.details["pruning_order"]
    bias0, _ = val_measures(copy.deepcopy(model), ds_ext)
    sign = math.copysign(1.0, bias0)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned[int(l1)].weight[c1] = 0
        pruned[int(l1)].bias[c1] = 0
    sal = fd_saliency(pruned, ext.batches, sign, 1) + fd_saliency(pruned, ext.batches, sign, 4)
    units = [(1, c) for c in range(4)] + [(4, c) for c in range(4)]
    sal[units.index((int(l1), c1))] = -np.inf
    assert units[int(np.argmax(sal))] == (int(l2), c2)


def test_prunable_layers_are_the_batchnorms_of_e_or_else_its_convs_and_linears():
    assert [n for n, _ in BP.prunable_layers(cnn())] == ["1", "4"]
    assert [n for n, _ in BP.prunable_layers(linear())] == ["1"]


# ---- FairPrune -----------------------------------------------------------------------------------------------------


def group_fisher(model, batches, group):
    """Hand-written Fisher diagonal of WBCE on group ``group``'s samples: per batch, zero grads, backward, square."""
    model = copy.deepcopy(model).eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y, a in batches:
        model.zero_grad()
        sel = a == group
        if sel.any():
            wbce(model(x).reshape(-1)[sel], y[sel]).backward()
            for n, p in model.named_parameters():
                fisher[n] += p.grad ** 2
    return {n: f / len(batches) for n, f in fisher.items()}


@pytest.mark.parametrize("beta", [1.0, 0.0, 2.5])
def test_fairprune_prunes_smallest_unprivileged_minus_beta_privileged_obd_saliency(beta):
    ds = dataset(64, 5, hw=4)
    ext, bal = Loader(ds), Loader(dataset(32, 6, hw=4))
    model = cnn(2)
    before = state(model)
    # privileged = the group with the higher accuracy
    x, y, a = ds.tensors
    with torch.no_grad():
        yhat = (torch.sigmoid(copy.deepcopy(model).eval()(x).reshape(-1)) > 0.5).float()
    acc = [float((yhat[a == g] == y[a == g]).float().mean()) for g in (0, 1)]
    priv = 0 if acc[0] >= acc[1] else 1
    f_u, f_p = group_fisher(model, ext.batches, 1 - priv), group_fisher(model, ext.batches, priv)

    res = FP.fairprune(model, ext, bal, config=FP.FairPruneConfig(ratio=0.25, beta=beta))
    assert bal.passes == 0 and res.details["privileged_group"] == priv
    expected = copy.deepcopy(before)
    for name, p in before.items():
        if name in f_u and p.dim() >= 2:
            half = 0.5 * p ** 2
            score = (half * f_u[name] - beta * half * f_p[name]).reshape(-1).numpy()
            k = round(0.25 * score.size)
            prune = np.argsort(score, kind="stable")[:k]
            expected[name].view(-1)[torch.as_tensor(prune)] = 0
            assert not res.masks[name].view(-1)[torch.as_tensor(prune)].any()
            assert int(res.masks[name].sum()) == score.size - k
        elif name in f_u:
            assert res.masks[name].all()
    # the pruned weights are exactly 0; every other parameter and buffer is bit-identical
    for name, v in model.state_dict().items():
        if name in f_u and before[name].dim() >= 2:
            torch.testing.assert_close(v, expected[name], rtol=0, atol=0)
        else:
            assert torch.equal(v, before[name]), name


def test_fairprune_errors_name_the_missing_group():
    x, y = torch.randn(8, 3, 4, 4), (torch.arange(8) % 2).float()
    only0 = Loader(TensorDataset(x, y, torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="attribute group 1"):
        FP.fairprune(cnn(), only0, only0)


# ---- mask ablations on the pipelines -------------------------------------------------------------------------------


def test_random_mask_is_swift_with_a_uniform_mask_and_reads_no_mask_data():
    ext, bal = Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4))
    cfg = AB.RandomMaskConfig(step1=plain(2), step2=plain(1), seed=3)
    model = cnn()
    res = AB.random_mask_swift(model, ext, bal, config=cfg)
    assert ext.passes == 0 and [h["step"] for h in res.history] == ["step1", "step1", "step2"]
    masks = random_mask(cnn(), 3)  # the mask seed defaults to the run's seed
    assert all(torch.equal(res.masks[n], masks[n]) for n in masks)
    flat = torch.cat([m.reshape(-1) for m in masks.values()])
    assert float(flat.min()) >= 0 and float(flat.max()) < 1  # uniform on [0, 1), not randn
    # the same as calling the SWiFT pipeline with that mask
    ref = cnn()
    swift(ref, Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4)),
                   config=SwiftConfig(step1=plain(2), step2=plain(1), seed=3), masks=masks)
    assert changed(state(ref), model) == set()


def numpy_ratio(ib, il):
    def norm(t):
        t = t.double().numpy()
        return t if t.max() == t.min() else (t - t.min()) / (t.max() - t.min() + 1e-10)

    return {n: norm(ib[n]) / (norm(il[n]) + 1e-10) for n in ib}


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_hard_mask_fine_tunes_fraction_r_of_e_and_fixes_the_rest(fraction):
    ds_ext = dataset(48, 5, hw=4)
    model = cnn()
    feature = sorted(CNN_PARAMS - CNN_HEAD)
    ib, il, _ = fisher_importance_two_pass(copy.deepcopy(model), DataLoader(ds_ext, batch_size=16), bias=SWIFT_BIAS)
    ratio = numpy_ratio(ib, il)
    q = np.percentile(np.concatenate([ratio[n].ravel() for n in feature]), 100 * (1 - fraction))
    before = state(model)
    res = AB.hard_mask_swift(model, Loader(ds_ext), Loader(dataset(48, 6, hw=4)),
                            config=AB.HardMaskConfig(fraction=fraction, step1=plain(2, lr=0.05), step2=plain(0)))
    n_e = sum(ratio[n].size for n in feature)
    selected = sum(int(res.masks[n].sum()) for n in feature)
    assert abs(selected - fraction * n_e) <= 1
    assert res.details["selected_fraction"] == pytest.approx(selected / n_e)
    for n in feature:
        m = res.masks[n].numpy()
        assert m.dtype == bool
        clear = np.abs(ratio[n] - q) > 1e-4 * max(abs(q), 1e-12)  # away from the threshold: exact agreement
        assert np.array_equal(m[clear], (ratio[n] > q)[clear]), n
        # unselected entries of E receive no gradient under plain SGD: bit-identical; selected ones move
        p_before, p_after = before[n].numpy(), model.state_dict()[n].numpy()
        assert np.array_equal(p_before[~m], p_after[~m]), n
    moved = sum(int((before[n] != model.state_dict()[n]).sum()) for n in feature)
    assert moved > 0.5 * selected
    # the head's mask comes from the same threshold and drives SWiFT's re-initialisation (θ[M > mean M] = 0)
    for n in CNN_HEAD:
        m = res.masks[n].float()
        reset = m > m.mean()
        assert torch.equal(model.state_dict()[n][reset], torch.zeros(int(reset.sum())))


@pytest.mark.parametrize("kind, moving", [("bn", {"1.weight", "1.bias", "4.weight", "4.bias"}),
                                          ("shallow_conv", {"0.weight"})])
def test_manual_masks_run_bmft_and_move_only_the_chosen_layers(kind, moving):
    ext, bal = Loader(dataset(32, 5, hw=4)), Loader(dataset(48, 6, hw=4))
    model = cnn()
    before = state(model)
    res = AB.manual_mask_bmft(model, ext, bal, config=AB.ManualMaskConfig(kind=kind, impair=plain(2), repair=plain(0)))
    # the guard's original score, two epochs, the guard's check
    assert [h["step"] for h in res.history] == ["impair", "impair"] and ext.passes == 1 + 2 + 1
    moved_params = changed(before, model) & CNN_PARAMS
    assert moved_params == moving | CNN_HEAD  # the chosen layers, and the head (zeroed)
    assert torch.count_nonzero(model[9].weight) == 0
    assert res.method == f"manual-{kind}"


# ---- finetune and the registry -------------------------------------------------------------------------------------


def test_finetune_freezes_the_rest_and_reports_each_epoch():
    model = cnn()
    before = state(model)
    for p in model[3].parameters():
        p.requires_grad_(False)  # a user's own flag, restored afterwards
    seen = []
    feats = {n: p for n, p in model.named_parameters() if n.startswith(("0.", "1."))}
    hist = FT.finetune(model, Loader(dataset(32, 5, hw=4)), feats, plain(3), wbce_weight=1.0, bias_weight=0.0,
                      after_epoch=seen.append)
    assert seen == [1, 2, 3] and [h["epoch"] for h in hist] == [1, 2, 3]
    assert changed(before, model) & CNN_PARAMS == set(feats)
    assert not any(p.requires_grad for p in model[3].parameters())
    assert model[0].weight.requires_grad and model.training


def test_registry_every_method_runs_with_the_shared_call_shape():
    from fastmask.methods.bmft import bmft

    assert registry.METHODS["swift"].run is swift and registry.METHODS["bmft"].run is bmft
    assert all(m.name == name and m.label and callable(m.config) for name, m in registry.METHODS.items())
    tiny = {
        "swift": SwiftConfig(step1=plain(1), step2=plain(1)), "bmft": BmftConfig(impair=plain(1), repair=plain(1)),
        "fullft-rw": FT.FullFTConfig(step=plain(1)), "fullft-reg": FT.FullFTConfig(step=plain(1)),
        "fullft-fdr": FT.FullFTConfig(step=plain(1)), "llft": FT.LLFTConfig(step=plain(1)),
        "diffgda": BP.DiffGdaConfig(step=StepConfig(1, 1e-3, "adam")), "diffprune": BP.DiffPruneConfig(max_steps=1),
        "random-mask": AB.RandomMaskConfig(step1=plain(1), step2=plain(1)),
        "manual-bn": AB.ManualMaskConfig(kind="bn", impair=plain(1), repair=plain(1)),
        "manual-top": AB.ManualMaskConfig(kind="shallow_conv", impair=plain(1), repair=plain(1)),
        **{f"hard-{r:g}": AB.HardMaskConfig(fraction=r, step1=plain(1), step2=plain(1))
           for r in registry.HARD_FRACTIONS},
    }
    for name, fn in registry.METHODS.items():
        res = fn(cnn(), Loader(dataset(32, 5, hw=4)), Loader(dataset(32, 6, hw=4)), config=tiny.get(name),
                 progress=False)
        assert isinstance(res, Result), name
    # the hard-mask presets default to their fraction, the manual presets to their kind
    assert registry.METHODS["hard-0.3"].config().fraction == 0.3
    assert registry.METHODS["manual-top"].config().kind == "shallow_conv"


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="metric"):
        BP.DiffGdaConfig(metric="auc")
    with pytest.raises(ValueError, match="ratio"):
        FP.FairPruneConfig(ratio=1.5)
    with pytest.raises(ValueError, match="fraction"):
        AB.HardMaskConfig(fraction=-0.1)
    with pytest.raises(ValueError, match="reinit"):
        FT.LLFTConfig(reinit="random")
    with pytest.raises(ValueError, match="units_per_step"):
        BP.DiffPruneConfig(units_per_step=0)
