"""The two-step pipelines (docs/algorithm.md §5, §8): which parameters move in each step, the losses and data each step
uses, head re-initialisation, faithful flags, the collapse guard and the profiler phases."""

import copy
import json
import logging

import pytest
import torch
from conftest import linear
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.fairness.losses import BMFT_BIAS, SWIFT_BIAS, wbce
from fastmask.masking.masks import random_mask
from fastmask.methods.bmft import bmft
from fastmask.methods.configs import BmftConfig, StepConfig, SwiftConfig
from fastmask.methods.swift import reinit_head, swift


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(4, 1),
    )


def dataset(n: int = 48, seed: int = 1, hw: int = 2) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    a = ((torch.arange(n) // 2) % 2).long()
    x = torch.randn(n, 3, hw, hw, generator=g) + y.view(-1, 1, 1, 1)
    return TensorDataset(x, y, a)


def loader(ds=None, batch_size=16):
    return DataLoader(ds or dataset(), batch_size=batch_size, shuffle=False)


class CountingLoader:
    """An iterable of batches that counts how often it is iterated."""

    def __init__(self, ds, batch_size=16):
        self.batches = list(DataLoader(ds, batch_size=batch_size))
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def plain(epochs, lr=0.1):
    """SGD without momentum or weight decay: a parameter with no (masked) gradient stays bit-identical."""
    return StepConfig(epochs, lr, "sgd", momentum=0.0, weight_decay=0.0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


HEAD = {"6.weight", "6.bias"}
FEATURES = {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_swift_step1_moves_only_features_and_step2_only_head():
    model = cnn()
    before = snapshot(model)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    swift(model, loader(), loader(), masks=ones,
          config=SwiftConfig(step1=plain(2), step2=plain(0), reinit_cmp="gt", reinit_scope="tensor"))
    # step 1 only (step 2 has 0 epochs; an all-ones head mask is never > its mean, so nothing is re-initialised)
    assert changed(before, model) == FEATURES

    model = cnn()
    swift(model, loader(), loader(), masks=ones, config=SwiftConfig(step1=plain(0), step2=plain(2)))
    assert changed(before, model) == HEAD


def test_swift_mask_reaches_the_optimizer():
    model = cnn()
    before = snapshot(model)
    masks = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    masks["0.weight"] = torch.zeros_like(model[0].weight)
    masks["0.weight"][0] = 1.0  # only the first output filter of the conv may move
    swift(model, loader(), loader(), masks=masks, config=SwiftConfig(step1=plain(2), step2=plain(0)))
    w = model[0].weight.detach()
    assert not torch.equal(w[0], before["0.weight"][0])
    assert torch.equal(w[1:], before["0.weight"][1:])

    # "grad" mode with weight decay: decay still moves masked-out weights (docs/algorithm.md §8.10); "update" mode
    # freezes them
    decay = StepConfig(2, 0.1, "sgd", momentum=0.9, weight_decay=0.1)
    for mode, frozen in (("grad", False), ("update", True)):
        model = cnn()
        swift(model, loader(), loader(), masks=masks, config=SwiftConfig(step1=decay, step2=plain(0), mask_mode=mode))
        assert torch.equal(model[0].weight.detach()[1:], before["0.weight"][1:]) is frozen, mode


def test_swift_losses_and_data_per_step():
    """Step 1 minimises β·WBCE + (1 − β)·B, step 2 (1 − β)·WBCE + β·B, both on train_loader (docs/algorithm.md §5)."""
    ds_mask, ds_train = dataset(32, seed=5), dataset(48, seed=6)
    mask_loader, train_loader = CountingLoader(ds_mask), CountingLoader(ds_train)
    model = linear()
    ref = copy.deepcopy(model)
    beta = 0.3
    res = swift(model, mask_loader, train_loader, config=SwiftConfig(beta=beta, step1=plain(1, lr=0.0),
                                                                      step2=plain(1, lr=0.0)))
    # importance: one pass over the mask data; the guard's score of the original model, then each step one pass plus
    # the guard's check after it
    assert mask_loader.passes == 1
    assert train_loader.passes == 1 + 4
    with torch.no_grad():
        z = [ref(x) for x, *_ in train_loader.batches]
        l1 = sum(float(beta * wbce(zb, y) + (1 - beta) * SWIFT_BIAS(zb, y, a))
                 for zb, (_, y, a) in zip(z, train_loader.batches, strict=True)) / 3
    assert [h["step"] for h in res.history] == ["step1", "step2"]
    assert res.history[0]["loss"] == pytest.approx(l1, rel=1e-6)
    # step 2 runs after the head re-initialisation: recompute with the re-initialised head
    reinit_head({"3.weight": ref[3].weight, "3.bias": ref[3].bias}, res.masks)
    with torch.no_grad():
        l2 = sum(float((1 - beta) * wbce(ref(x), y) + beta * SWIFT_BIAS(ref(x), y, a))
                 for x, y, a in train_loader.batches) / 3
    assert res.history[1]["loss"] == pytest.approx(l2, rel=1e-6)
    assert res.n_importance_batches == 2


def test_bmft_impair_uses_external_data_and_bias_only_then_zeroes_head():
    ds_mask, ds_train = dataset(32, seed=5), dataset(48, seed=6)
    mask_loader, train_loader = CountingLoader(ds_mask), CountingLoader(ds_train)
    model = linear()
    ref = copy.deepcopy(model)
    before = snapshot(model)
    res = bmft(model, mask_loader, train_loader, config=BmftConfig(impair=plain(1, lr=0.0), repair=plain(0)))
    assert mask_loader.passes == 4  # importance, the guard's original score, impair, the guard's check
    assert train_loader.passes == 2  # the guard's original score; repair has 0 epochs; the guard's check
    with torch.no_grad():
        loss = sum(float(BMFT_BIAS(ref(x), y, a)) for x, y, a in mask_loader.batches) / 2
    assert res.history[0]["step"] == "impair" and res.history[0]["loss"] == pytest.approx(loss, rel=1e-6)
    assert torch.count_nonzero(model[3].weight) == 0 and torch.count_nonzero(model[3].bias) == 0
    assert res.head_reset_fraction == 1.0
    assert model[3].weight.requires_grad  # flags restored
    # the head's hard mask is 0, about half of E is selected (rate 50)
    assert not res.masks["3.weight"].any() and not res.masks["3.bias"].any()
    e = torch.cat([res.masks[n].reshape(-1).float() for n in ("1.weight", "1.bias")])
    assert 0.4 < float(e.mean()) < 0.6
    assert torch.equal(before["1.weight"], model[1].weight.detach())  # lr 0

    # impair_data="balanced" ([PB]) runs the impair step on train_loader, and only masked-in E entries move
    mask_loader, train_loader = CountingLoader(ds_mask), CountingLoader(ds_train)
    model = linear()
    res = bmft(model, mask_loader, train_loader,
               config=BmftConfig(impair=plain(2), repair=plain(1), impair_data="balanced"))
    assert mask_loader.passes == 1 and train_loader.passes == 1 + 2 + 1 + 1 + 1
    moved = model[1].weight.detach() != before["1.weight"]
    assert torch.equal(moved, res.masks["1.weight"] & moved)
    assert moved.any()


def test_bmft_repair_loss_and_defaults():
    cfg = BmftConfig()
    assert cfg.impair == StepConfig(5, 1e-4, "sgd", 0.9, 5e-4) and cfg.repair.lr == 1e-3
    assert BmftConfig(faithful=True).impair.epochs == 10  # the code's 10 + 10 (docs/algorithm.md §8.14)
    model = linear()
    res = bmft(model, loader(), loader(), config=BmftConfig(beta=0.4, impair=plain(0), repair=plain(1, lr=0.0)))
    ds = loader()
    with torch.no_grad():
        loss = sum(float(wbce(model(x), y) + 0.4 * BMFT_BIAS(model(x), y, a)) for x, y, a in ds) / 3
    assert res.history[-1]["step"] == "repair" and res.history[-1]["loss"] == pytest.approx(loss, rel=1e-6)


def test_reinit_head_hand_example():
    def head():
        return {"w": nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), "b": nn.Parameter(torch.tensor([5.0]))}

    masks = {"w": torch.tensor([[0.1, 0.5, 0.5, 0.9]]), "b": torch.tensor([0.7])}
    # per tensor: γ_w = 0.5, γ_b = 0.7
    h = head()
    frac = reinit_head(h, masks, "gt", "tensor")
    assert h["w"].tolist() == [[1.0, 2.0, 3.0, 0.0]] and h["b"].tolist() == [5.0]  # the bias is never reset
    assert frac == pytest.approx(1 / 5)
    h = head()
    reinit_head(h, masks, "ge", "tensor")
    assert h["w"].tolist() == [[1.0, 0.0, 0.0, 0.0]] and h["b"].tolist() == [0.0]
    # whole head: γ = (0.1 + 0.5 + 0.5 + 0.9 + 0.7) / 5 = 0.54
    h = head()
    reinit_head(h, masks, "gt", "head")
    assert h["w"].tolist() == [[1.0, 2.0, 3.0, 0.0]] and h["b"].tolist() == [0.0]
    masks_eq = {"w": torch.tensor([[0.2, 0.6, 0.6, 0.6]]), "b": torch.tensor([0.5])}  # γ = 2.5 / 5 = 0.5
    h = head()
    reinit_head(h, masks_eq, "gt", "head")
    assert h["w"].tolist() == [[1.0, 0.0, 0.0, 0.0]] and h["b"].tolist() == [5.0]
    h = head()
    reinit_head(h, masks_eq, "ge", "head")
    assert h["w"].tolist() == [[1.0, 0.0, 0.0, 0.0]] and h["b"].tolist() == [0.0]
    with pytest.raises(ValueError, match="no mask for head parameter 'b'"):
        reinit_head(head(), {"w": masks["w"]})


def test_step2_feature_eval_keeps_bn_statistics():
    ones = None
    for feature_eval, bn_moves in ((False, True), (True, False)):
        model = cnn()
        ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
        rm = model[1].running_mean.clone()
        swift(model, loader(), loader(), masks=ones,
              config=SwiftConfig(step1=plain(0), step2=plain(1), step2_feature_eval=feature_eval))
        assert (not torch.equal(rm, model[1].running_mean)) is bn_moves


def test_faithful_flags():
    assert SwiftConfig(faithful=True).step1 == StepConfig(10, 1e-4, "sgd", 0.9, 5e-4)
    cxr = SwiftConfig(task="cxr", faithful=True)
    assert cxr.step1.optimizer == "adam" and cxr.step1.weight_decay == 0 and cxr.step2.lr == 1e-3
    SwiftConfig(task="cxr", faithful=True, step1=StepConfig(5, 1e-6, "adam", weight_decay=0.0))  # README's CXR lr
    with pytest.raises(ValueError, match="weight_decay"):
        SwiftConfig(task="cxr", faithful=True, step1=StepConfig(5, 1e-6, "adam"))
    quirks = ((dict(mask_mode="update"), "mask_mode"), (dict(reinit_cmp="ge"), "reinit_cmp"),
              (dict(reinit_scope="head"), "reinit_scope"), (dict(step2_feature_eval=True), "step2_feature_eval"),
              (dict(step2=StepConfig(10, 1e-3, "adam")), "optimizer"))
    for bad, name in quirks:
        with pytest.raises(ValueError, match=name):
            SwiftConfig(faithful=True, **bad)
        SwiftConfig(**bad)  # fine without faithful
    with pytest.raises(ValueError, match="impair_data"):
        BmftConfig(faithful=True, impair_data="balanced")
    with pytest.raises(ValueError, match="reinit_cmp"):
        SwiftConfig(reinit_cmp="gte")
    with pytest.raises(ValueError, match="optimizer"):
        StepConfig(1, 0.1, "rmsprop")


def test_masks_checked():
    model = cnn()
    masks = random_mask(model)
    masks["0.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        swift(model, loader(), loader(), masks=masks)
    del masks["0.weight"]
    with pytest.raises(ValueError, match="no mask for parameter '0.weight'"):
        swift(model, loader(), loader(), masks=masks)


def test_collapse_guard_fires_on_degenerate_model(caplog):
    model = linear()
    with torch.no_grad():
        model[3].bias.fill_(100.0)  # every prediction positive; labels are half positive
    with caplog.at_level(logging.WARNING, logger="fastmask.methods.engine"):
        res = swift(model, loader(), loader(), config=SwiftConfig(step1=plain(1, lr=0.0), step2=plain(1, lr=0.0)))
    assert [(w.kind, w.step) for w in res.guard_warnings] == [("collapse", "step1"), ("collapse", "step2")]
    w = res.guard_warnings[0]
    assert w.positive_share == 1.0 and w.label_positive_rate == 0.5
    assert "collapse" in caplog.text and "100.0% of the predictions are positive" in caplog.text


def test_bmft_impair_collapse_is_recorded_not_judged():
    """BMFT's impair step minimises the bias alone and its head is zeroed next: a collapse after it is recorded in
    the checks but not a warning (advice to raise a WBCE weight the step does not have would be wrong); after the
    repair step the same collapse is."""
    model = linear()
    with torch.no_grad():
        model[3].bias.fill_(100.0)  # every prediction positive; labels are half positive
    config = BmftConfig(impair=plain(1, lr=0.0), repair=plain(1, lr=0.0))
    res = bmft(model, loader(), loader(), config=config, masks={n: torch.ones_like(p, dtype=torch.bool)
                                                                for n, p in model.named_parameters()})
    impair = next(c for c in res.checks if c["step"] == "impair")
    assert impair["positive_share"] == 1.0 and impair["label_positive_rate"] == 0.5
    # after repair at lr 0 the zeroed head gives p = 0.5 everywhere, i.e. every prediction negative: that collapse
    # is the delivered model's, and judged
    assert [(w.kind, w.step) for w in res.guard_warnings] == [("collapse", "repair")]
    assert res.guard_warnings[0].positive_share == 0.0


def test_collapse_guard_silent_on_healthy_model_and_labels_matter():
    model = linear()
    with torch.no_grad():  # a model that separates the classes: z = 5·(mean x − 0.5)
        model[1].weight.fill_(1.0 / 12)
        model[1].bias.zero_()
        model[3].weight.fill_(5.0)
        model[3].bias.fill_(-2.5 * 0.96)
    res = swift(model, loader(), loader(), config=SwiftConfig(step1=plain(1, lr=0.0), step2=plain(1, lr=0.0)))
    assert [w for w in res.guard_warnings if w.kind == "collapse"] == []
    assert res.checks[0]["step"] == "original" and 0.2 < res.checks[1]["positive_share"] < 0.8
    # all-positive predictions on all-positive labels are not a collapse
    ds = dataset()
    pos = TensorDataset(ds.tensors[0], torch.ones(48), ds.tensors[2])
    model = linear()
    with torch.no_grad():
        model[3].bias.fill_(100.0)
    res = swift(model, loader(pos), loader(pos), config=SwiftConfig(step1=plain(1, lr=0.0), step2=plain(1, lr=0.0)))
    assert res.guard_warnings == []


def test_phases_in_profiler_trace():
    model = cnn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        swift(model, loader(), loader(), config=SwiftConfig(step1=plain(1), step2=plain(1)))
    names = {e.key for e in prof.key_averages()}
    for phase in ("fastmask.importance", "fastmask.mask", "fastmask.step1", "fastmask.head_reinit",
                  "fastmask.step2"):
        assert phase in names


def test_seeded_runs_are_reproducible_and_state_restored():
    shuffled = DataLoader(dataset(), batch_size=16, shuffle=True)
    out = []
    for _ in range(2):
        model = cnn()
        model.eval()
        model[0].bias.requires_grad_(False)
        res = swift(model, shuffled, shuffled, config=SwiftConfig(step1=plain(2), step2=plain(2), seed=7))
        out.append(snapshot(model))
        assert not model.training and not model[0].bias.requires_grad and model[6].weight.requires_grad
        assert len(res.history) == 4 and all(0 <= h["positive_share"] <= 1 for h in res.history)
        cfg = json.loads(json.dumps(res.config_dict()))
        assert cfg["step1"]["epochs"] == 2 and cfg["bias"] == {"space": "log", "form": "eodds_abs", "empty": "zero"}
    for n in out[0]:
        assert torch.equal(out[0][n], out[1][n])


def test_guard_warns_on_a_drifting_share_and_an_accuracy_drop_after_the_last_step_only():
    """The relative guard: the original model's share and accuracy are the reference; after the last step a share
    more than share_tolerance away from the label rate, or an accuracy more than max_acc_drop below the original's,
    is a warning (kinds "share" and "accuracy"); after a first step only a collapse counts."""
    from fastmask.methods.engine import GuardConfig, guard_before, guard_check
    from fastmask.methods.state import Result

    x = torch.linspace(-1, 1, 100).reshape(-1, 1)
    y = (x[:, 0] > 0.5).float()  # 25 % positive
    a = torch.arange(100) % 2
    data = DataLoader(TensorDataset(x, y, a), batch_size=32)
    model = nn.Sequential(nn.Linear(1, 1))
    with torch.no_grad():  # z = 10 (x − 0.5): the original model is right everywhere
        model[0].weight.fill_(10.0)
        model[0].bias.fill_(-5.0)
    res = Result("swift", None, {})
    guard = GuardConfig(share_tolerance=0.10, max_acc_drop=0.02)
    guard_before(res, {"balanced": data}, model, torch.device("cpu"))
    assert res.checks == [{"step": "original", "data": "balanced", "positive_share": 0.25,
                           "label_positive_rate": 0.25, "acc": 1.0}]
    with torch.no_grad():  # now positive above x = 0: 50 % positive, accuracy 0.75
        model[0].bias.fill_(0.0)
    guard_check(res, "step1", "balanced", model, data, torch.device("cpu"), guard, last=False)
    assert res.guard_warnings == []
    guard_check(res, "step2", "balanced", model, data, torch.device("cpu"), guard)
    assert [(w.kind, w.step) for w in res.guard_warnings] == [("share", "step2"), ("accuracy", "step2")]
    assert res.guard_warnings[1].acc == pytest.approx(0.75)
    # within tolerances: silent
    quiet = Result("swift", None, {}, checks=list(res.checks[:1]))
    guard_check(quiet, "step2", "balanced", model, data, torch.device("cpu"),
                GuardConfig(share_tolerance=0.3, max_acc_drop=0.3))
    assert quiet.guard_warnings == []
