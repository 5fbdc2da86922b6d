"""split_head: the head by module path or as the last Linear; E by module membership (docs/algorithm.md §8.20)."""

import pytest
import torch
from torch import nn

from fastmask.model.head import find_head_name, split_head


class TorchvisionResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(self.pool(self.bn1(self.conv1(x))).flatten(1))


class TimmLike(nn.Module):
    """timm-style: a ``head`` module (dropout + ``head.fc``) and a backbone layer whose name contains "head", which
    must stay in E."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.attn_head_proj = nn.Linear(4, 4)  # name contains "head" but is a backbone layer
        self.head = nn.Sequential()
        self.head.add_module("drop", nn.Dropout(0.5))
        self.head.add_module("fc", nn.Linear(4, 1))

    def forward(self, x):
        h = self.stem(x).mean((2, 3))
        return self.head(self.attn_head_proj(h))


def test_auto_head_is_last_linear_torchvision():
    model = TorchvisionResNetLike()
    head, head_params, feat = split_head(model)
    assert head is model.fc
    assert list(head_params) == ["fc.weight", "fc.bias"]
    assert list(feat) == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    assert find_head_name(model) == "fc"


def test_auto_head_timm_membership_not_names():
    model = TimmLike()
    head, head_params, feat = split_head(model)
    assert head is model.head.fc
    assert list(head_params) == ["head.fc.weight", "head.fc.bias"]
    # a backbone parameter whose name contains "head" stays in E
    assert "attn_head_proj.weight" in feat and "attn_head_proj.bias" in feat


def test_named_head_sequential():
    model = TimmLike()
    head, head_params, feat = split_head(model, "head")
    assert head is model.head
    assert set(head_params) == {"head.fc.weight", "head.fc.bias"}
    assert set(head_params).isdisjoint(feat)
    assert len(head_params) + len(feat) == len(list(model.parameters()))


def test_classifier_sequential_torchvision_densenet_style():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("classifier", nn.Sequential(nn.Dropout(), nn.Linear(4, 1)))
    assert find_head_name(model) == "classifier.1"
    _, head_params, _ = split_head(model, "classifier")
    assert list(head_params) == ["classifier.1.weight", "classifier.1.bias"]


def test_shared_parameter_counted_once():
    model = TorchvisionResNetLike()
    model.extra = nn.Linear(4, 1)
    model.extra.weight = model.fc.weight  # tied: the head's weight is also registered elsewhere
    head, head_params, feat = split_head(model, "fc")
    ids_head = {id(p) for p in head_params.values()}
    assert all(id(p) not in ids_head for p in feat.values())
    assert id(model.fc.weight) in ids_head


def test_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        split_head(nn.Sequential(nn.Conv2d(3, 1, 3)))
    with pytest.raises(ValueError, match="'nope' is not a module"):
        split_head(TorchvisionResNetLike(), "nope")
    multi = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="out_features=3.*one logit"):
        split_head(multi)
    with pytest.raises(ValueError, match="no parameters"):
        split_head(nn.Sequential(nn.Linear(4, 1), nn.ReLU()), "1")


def test_split_covers_every_parameter_once():
    model = TimmLike()
    _, head_params, feat = split_head(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted([*head_params, *feat])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 5, 5)).shape == (2, 1)
