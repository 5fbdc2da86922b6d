"""The preprocessing options (docs/cli.md, "Preprocessing"): each setting reaches the transform (normalisation,
resize-then-crop, augmentations switched off), the model's own configuration supplies what the flags leave unset,
and a size other than the configuration's warns.

Oracles: PIL and numpy written out here (a bilinear resize, a slice, (u8 / 255 - mean) / std)."""

from __future__ import annotations

import argparse
import io
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_shards import make_images

from fastmask.app.cli import _preprocessing, build_parser
from fastmask.app.errors import UsageError
from fastmask.app.preprocessing import resolve_preprocessing
from fastmask.app.sets import DataSpec
from fastmask.data.loader import make_loader
from fastmask.data.shards import write_shards
from fastmask.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, decode_image
from fastmask.model.weights import build_model, input_config

SIZE = 8


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(14, 18, 3), dtype=np.uint8)


def test_normalisation_reaches_the_batch(image):
    resized = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float64) / 255
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                      ((0.5, 0.25, 0.1), (0.2, 0.3, 0.4))):
        x = Preprocessing(image_size=SIZE, mean=mean, std=std).transform(train=False)(png(image))
        want = ((resized - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
        np.testing.assert_allclose(x.numpy(), want, atol=1e-5)


def test_crop_is_the_centre_of_the_resized_image(image):
    got = decode_image(png(image), 12, crop=6)
    want = np.asarray(Image.fromarray(image).resize((12, 12), Image.BILINEAR))[3:9, 3:9]
    np.testing.assert_array_equal(got, want)
    x = Preprocessing(image_size=12, crop=6).transform(train=True)(png(image), np.random.default_rng(0))
    assert x.shape == (3, 6, 6)
    with pytest.raises(ValueError, match="crop must be a positive int at most the resize, 12 px"):
        Preprocessing(image_size=12, crop=13)


def epochs_of(loader, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Per epoch, each key's image (the shuffle buffer reorders keys; the images are what the test compares)."""
    out = []
    for _ in range(n):
        images: dict[str, torch.Tensor] = {}
        for x, _, _, keys in loader:
            images.update(zip(keys, x, strict=True))
        out.append(images)
    return out


@pytest.mark.parametrize("augment", [("hflip",), ("vflip",), ("transpose",), ()])
def test_augmentations_switched_off_give_the_same_images_every_epoch(tmp_path: Path, augment):
    root = tmp_path / "images"
    table = make_images(root, n=12, size=(SIZE, SIZE))
    write_shards(table, root, tmp_path / "shards", attr_cols=["sex"], maxcount=6)
    prep = Preprocessing(image_size=SIZE, augment=augment)
    loader = make_loader(tmp_path / "shards", batch_size=4, train=True, image_size=SIZE, attr="sex", seed=0,
                         transform=prep.transform(train=True), return_keys=True, drop_last=False)
    first, second = epochs_of(loader)
    assert first.keys() == second.keys() and len(first) == 12
    same = [torch.equal(first[k], second[k]) for k in first]
    # An augmentation left on changes some image between two epochs (each flip has probability 0.5 per image).
    assert all(same) if not augment else not all(same)


class Configured(torch.nn.Module):
    """A module:callable model stating its preprocessing as timm's models do."""

    def __init__(self, cfg: dict, attribute: str = "pretrained_cfg") -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        setattr(self, attribute, cfg)


CFG = {"input_size": (3, 12, 12), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "crop_pct": 0.75,
       "interpolation": "bicubic"}


def test_the_model_configuration_supplies_what_the_flags_leave_unset(caplog):
    with caplog.at_level(logging.WARNING, logger="fastmask.app"):
        r = resolve_preprocessing(Configured(CFG))
    p = r.preprocessing
    # timm's evaluation: resize to floor(12 / 0.75) = 16, centre crop 12
    assert (p.image_size, p.crop, p.mean, p.std) == (16, 12, CFG["mean"], CFG["std"])
    assert r.sources == {"image_size": "model config", "crop": "model config", "center_crop": "default",
                         "mean": "model config", "std": "model config", "augment": "default"}
    assert r.warnings == [] and not caplog.records
    assert r.record()["model_config"]["interpolation"] == "bicubic"
    # default_cfg, timm's older name, is read too; a configuration without crop_pct: a plain resize
    r = resolve_preprocessing(Configured({"input_size": (3, 20, 20)}, "default_cfg"))
    assert (r.preprocessing.image_size, r.preprocessing.crop, r.preprocessing.mean) == (20, None, IMAGENET_MEAN)
    assert r.sources["mean"] == "default" and r.model_config["attribute"] == "default_cfg"
    # no configuration: the defaults
    r = resolve_preprocessing(torch.nn.Linear(3, 1))
    assert (r.preprocessing.image_size, r.model_config) == (256, None)
    assert set(r.sources.values()) == {"default"}


def test_a_size_other_than_the_configuration_warns_naming_both(caplog):
    with caplog.at_level(logging.WARNING, logger="fastmask.app"):
        r = resolve_preprocessing(Configured(CFG), image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert r.sources["image_size"] == "flag" and r.sources["mean"] == "flag" and r.preprocessing.crop is None
    assert r.warnings == ["--image-size 32: the model sees 32 px images, but its configuration (pretrained_cfg "
                          "input_size) expects 12 px"]
    assert [rec.getMessage() for rec in caplog.records] == r.warnings
    assert resolve_preprocessing(Configured(CFG), image_size=14, crop=12).warnings == []


class FakeWeights:
    """torchvision's weights enum member, as far as fastmask reads it: its name and its transforms preset."""

    def __str__(self) -> str:
        return "ResNet50_Weights.IMAGENET1K_V2"

    def transforms(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(crop_size=[224], resize_size=[232], mean=[0.485, 0.456, 0.406],
                                     std=[0.229, 0.224, 0.225], interpolation=types.SimpleNamespace(value="bilinear"))


def test_a_torchvision_architecture_takes_its_default_weights_transforms(monkeypatch):
    def get_model_weights(name):
        if name != "resnet50":
            raise ValueError(f"no weights for {name}")
        return types.SimpleNamespace(DEFAULT=FakeWeights())

    models = types.SimpleNamespace(list_models=lambda: ["resnet50", "nope"], get_model_weights=get_model_weights,
                                   get_model=lambda name, **kwargs: torch.nn.Linear(3, 1))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    r = resolve_preprocessing(build_model("resnet50"))
    # torchvision evaluates ResNet-50 V2 at resize 232, centre crop 224
    assert (r.preprocessing.image_size, r.preprocessing.crop, r.preprocessing.mean) == (232, 224, IMAGENET_MEAN)
    assert r.sources["image_size"] == r.sources["crop"] == r.sources["mean"] == "model config"
    assert r.model_config["from"] == "torchvision ResNet50_Weights.IMAGENET1K_V2 transforms"
    assert input_config(build_model("nope")) is None  # an architecture without weights states nothing


def test_an_unreadable_configuration_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"the model's pretrained_cfg\['mean'\] is \(0.5, 0.5\), not 3 numbers"):
        input_config(Configured({**CFG, "mean": (0.5, 0.5)}))


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["debias", "--model", "m:f", "--weights", "w", "--shards", "s", "--attr", "a",
                                      "--method", "swift", "--out", "o", *argv])


def test_the_flags_reach_the_run_spec_and_its_transforms():
    args = parse("--normalize", "none", "--image-size", "20", "--crop", "16", "--augment", "vflip")
    data, resolved = DataSpec(shards="s", attr="a", **_preprocessing(args)).resolve(Configured(CFG))
    train = data.preprocessing().transform(train=True)
    assert (train.image_size, train.crop, train.mean, train.std) == (20, 16, (0.0,) * 3, (1.0,) * 3)
    assert (train.hflip, train.vflip, train.transpose) == (0.0, 0.5, 0.0)
    assert resolved.sources == {"image_size": "flag", "crop": "flag", "center_crop": "default", "mean": "flag",
                                "std": "flag", "augment": "flag"}
    assert resolved.warnings == ["--crop 16: the model sees 16 px images, but its configuration (pretrained_cfg "
                                 "input_size) expects 12 px"]
    given = _preprocessing(parse("--mean", "0.1", "0.2", "0.3", "--std", "1", "2", "3", "--augment", "none"))
    assert (given["mean"], given["std"], given["augment"]) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0), ())
    for argv, message in ((("--normalize", "none", "--mean", "0", "0", "0"), "--normalize and --mean / --std"),
                          (("--mean", "0", "0", "0"), "--mean needs --std"),
                          (("--augment", "none", "hflip"), "none turns every augmentation off")):
        with pytest.raises(UsageError, match=message):
            _preprocessing(parse(*argv))
