"""``fastmask demo``: a spurious-correlation benchmark on scikit-learn's bundled handwritten digits (no download).

The task: is the digit >= 5 (y = 1)? Each 8×8 digit is drawn in one of two tints, the sensitive attribute a (red-ish
for a = 0, blue-ish for a = 1). In the training split the tint agrees with the label for ``agreement`` (90 %) of the
images, so an ERM-trained CNN learns to read the tint as well as the shape; in the external and test splits the tint
is independent of the label. On the test split the biased model then predicts "positive" more often for blue digits
of either class: a large equalised-odds gap.

The demo trains that biased CNN with ERM, then debiases copies of it with BMFT and SWiFT as a user would, through
the public API: a validation part held out of the external set (:func:`fastmask.data.splits.stratified_split`), the
group-balanced D_r drawn from the rest (:func:`fastmask.data.balance.group_balance`), and each method's default
configuration selected on the validation part (:func:`fastmask.methods.selection.select`, its default grid and
rule). It reports, on the test split at each model's decision threshold, AUC, accuracy, the share of positive
predictions, the equalised-odds gap in its mean and max forms beside the authors' code's signed sum, and the
worst-group AUC.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from fastmask.app.tables import HEADLINE, METRIC_NAMES, markdown_table
from fastmask.data.balance import group_balance
from fastmask.data.image_table import ImageTableDataset
from fastmask.data.loader import ShardLoader, make_loader
from fastmask.data.shards import ShardIndex, write_shards
from fastmask.data.splits import stratified_split
from fastmask.fairness.losses import wbce
from fastmask.fairness.metrics import evaluate
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import Selection, select
from fastmask.model.scoring import score as score_model
from fastmask.util.files import atomic_write_bytes

__all__ = ["DigitsSplits", "tinted_images", "digits_benchmark", "stream", "DemoCNN", "train_erm", "score",
           "prepare", "parts", "run", "format_table", "main", "METRICS"]

#: The demo table's columns: the headline (:mod:`fastmask.app.tables`) and the worst-group AUC.
METRICS = (*HEADLINE, "worst_group_auc")

# Share of training images whose tint agrees with the label.
AGREEMENT = 0.9
# Tints per attribute value, as RGB multipliers of the digit's ink.
TINTS = np.array([[1.0, 0.35, 0.25], [0.25, 0.45, 1.0]])
# The digits are 8 x 8; the loader keeps that size (no resize).
IMAGE_SIZE = 8


@dataclass
class DigitsSplits:
    """The three splits written as WebDataset shards in a temporary directory: ``train`` (tint agrees with the
    label), ``external`` and ``test_shards`` (tint independent of the label), each a
    :class:`~fastmask.data.shards.ShardIndex` with the label column ``target`` and the attribute ``tint``.

    ``test`` is the test split as a map-style dataset over the same PNG files, with the same transform (for code
    that wants a ``torch.utils.data.DataLoader``, such as ``fastmask compare``); it yields the same values as the
    shards. The directory lives as long as this object; :meth:`close` removes it at once.
    """

    train: ShardIndex
    external: ShardIndex
    test_shards: ShardIndex
    test: ImageTableDataset
    workdir: tempfile.TemporaryDirectory

    def close(self) -> None:
        """Remove the shards and images."""
        self.workdir.cleanup()


def tinted_images(images: np.ndarray, a: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 8, 8, 3]: the ink (0..16 in scikit-learn's digits) scaled to 0..255 and multiplied by the
    tint of attribute ``a``, rounded to the nearest integer (the only loss: at most 0.5 / 255 per pixel)."""
    ink = images.astype(np.float64) / 16.0
    return np.rint(ink[..., None] * TINTS[a][:, None, None, :] * 255.0).astype(np.uint8)


def digits_benchmark(
    seed: int, agreement: float = AGREEMENT, fractions: tuple[float, float] = (0.5, 0.25)
) -> DigitsSplits:
    """Split the 1,797 digits (seeded) into train / external / test (50 / 25 / 25 % by default) with y = 1[digit >= 5]
    and a tint attribute a that equals y for ``agreement`` of the training images and is a fair coin elsewhere.

    Every split is written as lossless PNGs plus a metadata table (``filepath``, ``target``, ``tint``) and then as
    shards (:func:`fastmask.data.shards.write_shards`) in a fresh temporary directory.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_train = int(fractions[0] * len(order))
    n_ext = int(fractions[1] * len(order))
    parts = {"train": order[:n_train], "external": order[n_train:n_train + n_ext], "test": order[n_train + n_ext:]}
    workdir = tempfile.TemporaryDirectory(prefix="fastmask-demo-")
    root = Path(workdir.name)
    out: dict[str, Any] = {}
    tables = {}
    for name, idx in parts.items():
        y = (digits.target[idx] >= 5).astype(np.int64)
        if name == "train":
            a = np.where(rng.random(len(idx)) < agreement, y, 1 - y)
        else:
            a = rng.integers(0, 2, len(idx))
        (root / "images" / name).mkdir(parents=True)
        paths = []
        for i, img in enumerate(tinted_images(digits.images[idx], a)):
            paths.append(f"{name}/{i:05d}.png")
            Image.fromarray(img, "RGB").save(root / "images" / paths[-1])
        tables[name] = pd.DataFrame({"filepath": paths, "target": y, "tint": a})
        out["test_shards" if name == "test" else name] = write_shards(
            tables[name], root / "images", root / "shards" / name, attr_cols="tint", maxcount=256)
    test = ImageTableDataset(tables["test"], root / "images", image_size=IMAGE_SIZE, attr="tint")
    return DigitsSplits(**out, test=test, workdir=workdir)


def stream(shards: ShardIndex, seed: int, *, batch_size: int = 64, shuffle: bool = True,
           keys: Iterable[str] | None = None) -> ShardLoader:
    """A loader over demo shards with the test transform (no flips: a flipped digit may be another digit), every
    sample once per epoch (``keys`` selects and repeats samples), shuffled from ``seed`` unless ``shuffle=False``."""
    return make_loader(shards, batch_size=batch_size, train=False, image_size=IMAGE_SIZE, seed=seed,
                       shuffle=shuffle, drop_last=False, keys=keys)


class DemoCNN(nn.Module):
    """A small CNN f = C∘E: three conv-BN-ReLU blocks and global average pooling (E), then SWiFT's head
    C = Dropout(0.5) + Linear(64, 1) returning the logit. Inputs are ImageNet-normalised RGB, as the loader
    yields them."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(3, width), *block(width, 2 * width), nn.MaxPool2d(2),
                                      *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_erm(model: nn.Module, loader: Iterable, *, epochs: int = 30, lr: float = 1e-3,
              progress: bool = False) -> nn.Module:
    """Plain ERM with the authors' WBCE and Adam over ``loader``'s ``(x, y, a)`` batches (one pass per epoch):
    the biased model the methods start from."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="ERM", disable=not progress, leave=False):
        for x, y, _a in loader:
            opt.zero_grad(set_to_none=True)
            wbce(model(x), y).backward()
            opt.step()
    return model.eval()


def score(model: nn.Module, loader: Iterable, threshold: float = 0.5) -> dict[str, float]:
    """:func:`fastmask.fairness.metrics.evaluate` of the model's predictions p = σ(z) (eval mode) over ``loader``,
    ŷ = 1[p > ``threshold``]."""
    s = score_model(model, loader)
    return evaluate(s.y, s.p, s.a, threshold=threshold)


def prepare(seed: int, *, progress: bool = False, batch_size: int = 64) -> tuple[DigitsSplits, DemoCNN]:
    """The seeded splits (as shards) and the biased ERM model, trained on the streamed training shards, that every
    method starts from."""
    torch.manual_seed(seed)
    splits = digits_benchmark(seed)
    return splits, train_erm(DemoCNN(), stream(splits.train, seed, batch_size=batch_size), progress=progress)


def parts(external: ShardIndex, seed: int, val_fraction: float = 0.25,
          batch_size: int = 64) -> tuple[ShardLoader, ShardLoader, ShardLoader | None]:
    """(mask_loader, train_loader, val_loader) over the external shards, as a user would build them: a validation
    part of ``val_fraction`` held out, stratified by (tint, label) (none when 0: ``val_loader`` is None); the mask
    loader over the unbalanced rest, the train loader over the group-balanced D_r drawn from it
    (:func:`group_balance` on the shard index's metadata table, applied by key). Test transforms, seeded."""
    table = external.table()
    fit, val = table, None
    if val_fraction > 0:
        fit_i, val_i = stratified_split(table["target"].to_numpy(), table["tint"].to_numpy(), val_fraction, seed)
        fit, val = table.iloc[fit_i], table.iloc[val_i]
    d_r = group_balance(fit, "tint", "target", seed=seed)["source_index"]
    val_loader = None if val is None else stream(external, seed, batch_size=512, shuffle=False, keys=val.index)
    return (stream(external, seed, batch_size=batch_size, keys=fit.index),
            stream(external, seed, batch_size=batch_size, keys=d_r), val_loader)


#: The methods of the demo: table name -> registry name.
DEMO_METHODS = {"BMFT": "bmft", "SWiFT": "swift"}


def run(seed: int = 0, *, progress: bool = True, batch_size: int = 64) -> dict[str, Any]:
    """The whole benchmark for one seed: each method's default configuration selected on the validation part.

    Returns ``{"seed", "seconds", "methods": {method: test metrics at its threshold}, "selected": {method: what
    was chosen, in words (:meth:`~fastmask.methods.selection.Selection.describe_choice`)}, "guard_warnings": {method:
    [messages of the chosen run]}, "selections": {method: Selection}}``.
    """
    start = time.perf_counter()
    splits, baseline = prepare(seed, progress=progress, batch_size=batch_size)
    try:
        mask_loader, train_loader, val_loader = parts(splits.external, seed, batch_size=batch_size)
        test_loader = stream(splits.test_shards, seed, batch_size=512, shuffle=False)
        methods = {"Baseline": score(baseline, test_loader)}
        selections: dict[str, Selection] = {}
        for name, method in DEMO_METHODS.items():
            model = copy.deepcopy(baseline)
            config = replace(METHODS[method].config(), seed=seed)
            selections[name] = select(model, method, mask_loader, train_loader, val_loader, config=config,
                                      progress=progress)
            methods[name] = score(model, test_loader, selections[name].threshold)
    finally:
        splits.close()
    return {
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "methods": {m: {k: v[k] for k in (*METRICS, "threshold")} for m, v in methods.items()},
        "selected": {m: s.describe_choice() for m, s in selections.items()},
        "guard_warnings": {m: [w.message for w in (s.result.guard_warnings if s.result else [])]
                           for m, s in selections.items()},
        "selections": selections,
    }


def format_table(methods: dict[str, dict[str, float]]) -> str:
    """The test metrics of every method, one row each, as a markdown table."""
    return markdown_table(["method", *(METRIC_NAMES[k] for k in METRICS), "threshold"],
                          [[name, *(m[k] for k in METRICS), m["threshold"]] for name, m in methods.items()])


def main(seed: int = 0, json_path: str | os.PathLike | None = None, progress: bool = True,
         threads: int = 1) -> dict[str, Any]:
    """``fastmask demo``: run, print one table per method, optionally write the JSON summary (atomically).

    ``threads`` sets torch's intra-op threads for the run (restored afterwards). The default, 1, is the fastest for
    this tiny CNN (a second thread costs more in synchronisation than it saves, and much more on a busy machine) and
    makes the numbers independent of the machine's core count, since parallel reductions sum in a different order.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run(seed, progress=progress)
    finally:
        torch.set_num_threads(previous)
    print(f"fastmask demo: digits >= 5, tint attribute (agreement {AGREEMENT:.0%} in training), seed {seed}; "
          "BMFT and SWiFT selected on a validation part of the external set; test split, EOdds (mean) = "
          "½(|ΔTPR| + |ΔFPR|), (max) = max(|ΔTPR|, |ΔFPR|), (code) = ½·|ΔTPR + ΔFPR| (opposite gaps cancel in it)")
    print()
    print(format_table(out["methods"]))
    for name, chosen in out["selected"].items():
        print(f"{name}: selected {chosen}")
    for name, messages in out["guard_warnings"].items():
        for msg in messages:
            print(f"WARNING ({name}): {msg}")
    print(f"\n{out['seconds']:.1f} s")
    summary = {k: out[k] for k in ("seed", "seconds", "methods", "selected", "guard_warnings")}
    if json_path is not None:
        atomic_write_bytes(json_path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary
