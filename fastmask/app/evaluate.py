"""``fastmask evaluate``: per-group metrics of a model on shards, for any number of attributes (any number of groups
each), as ``metrics.md``, ``groups.csv`` and ``metrics.json`` (:func:`fastmask.app.report.write_evaluation`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastmask
from fastmask.app.preprocessing import resolve_preprocessing
from fastmask.app.report import group_rows, one_class_warning, write_evaluation
from fastmask.app.sets import fold_keys, load_index
from fastmask.data.loader import make_loader
from fastmask.data.stats import MAX_SKIP_FRACTION
from fastmask.fairness.metrics import acc, auc, auc_gap, eodds, eopp, group_table, spd, worst_group_auc
from fastmask.model.scoring import score
from fastmask.model.weights import Library, load_model, saved_threshold
from fastmask.util.files import jsonable


def evaluate(
    *,
    model: str,
    weights: str | os.PathLike | None,
    shards: str | os.PathLike,
    out: str | os.PathLike,
    attrs: Sequence[str] | None = None,
    fold: str | None = None,
    batch_size: int = 64,
    image_size: int | None = None,
    center_crop: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    workers: int = 0,
    trust_pickle: bool = False,
    library: Library = "auto",
    device: str | None = None,
    strict: bool = False,
    progress: bool = True,
    threshold: float | None = None,
    max_skip_fraction: float = MAX_SKIP_FRACTION,
) -> dict[str, Any]:
    """Per-group metrics of ``model`` on shards (all, or one ``fold``) for each attribute in ``attrs`` (default:
    all of the shards' attributes), written as ``metrics.md``, ``groups.csv`` and ``metrics.json`` in ``out``.

    Per attribute: :func:`fastmask.fairness.metrics.group_table` over its raw values (any number of groups), the
    worst-group AUC and AUC gap over the groups holding both classes, and for a two-valued attribute the gaps SPD,
    EOpp and EOdds (mean, max, code) between its two values. Hard predictions are ŷ = 1[p > ``threshold``]; None
    takes the threshold ``fastmask debias`` saved with the weights, else 0.5. Returns the content of
    ``metrics.json``, whose ``data`` says how many samples were planned, read and skipped as damaged; more than
    ``max_skip_fraction`` of them skipped raises :class:`fastmask.data.stats.DataLossError`.

    The preprocessing (``image_size``, ``crop``, ``center_crop``, ``mean``, ``std``; None: the model's configuration,
    else the default) is decided by :func:`fastmask.app.preprocessing.resolve_preprocessing` and recorded in
    ``preprocessing``; ``warnings`` holds its warnings and one when the model predicts one class for nearly everyone
    (its gaps are then near 0 whatever its fairness).
    """
    if threshold is None:
        saved = saved_threshold(weights) if weights is not None else None
        threshold = 0.5 if saved is None else saved
    index = load_index(os.fspath(shards), "--shards")
    names = list(attrs) if attrs else index.attr_cols
    missing = [a for a in names if a not in index.attr_cols]
    if missing:
        raise ValueError(f"--attr {missing[0]!r}: no such attribute column in the shards under {index.root}; their "
                         f"attribute columns are {index.attr_cols}")
    chosen = set(index.samples) if fold is None else fold_keys(index, fold, "--fold")
    keys = [k for k in index.samples if k in chosen]
    description = f"fold {fold!r} of {index.root}" if fold is not None else f"all of {index.root}"
    labels = {int(index.samples[k]["label"]) for k in keys}
    if len(labels) < 2:
        raise ValueError(f"single-class data: all {len(keys)} samples of {description} have label {labels.pop()}; "
                         "AUC needs both classes")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_model(model, weights, trust_pickle=trust_pickle, library=library).to(dev)
    resolved = resolve_preprocessing(net, image_size=image_size, crop=crop, center_crop=center_crop, mean=mean,
                                     std=std)
    prep = resolved.preprocessing
    # The loader's `a` is not used (groups come from the raw values below); any value must still map to an int.
    values = sorted({str(index.samples[k]["attrs"][names[0]]) for k in keys})
    loader = make_loader(index, batch_size=batch_size, train=False, image_size=prep.image_size, workers=workers,
                         keys=keys, attr=names[0], attr_map={v: i for i, v in enumerate(values)},
                         transform=prep.transform(train=False), strict=strict, return_keys=True)
    y, p, _, got = score(net, loader, dev, progress=progress, desc="evaluate")
    stats = loader.stats
    stats.check_loss(max_skip_fraction, f"the evaluation set ({description})",
                     "; --max-skip-fraction raises the limit, --strict stops at the first damage")
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        raise ValueError(f"single-class data: the {len(y)} readable samples of {description} all have label "
                         f"{int(y[0])}; AUC needs both classes")
    evaluation: dict[str, Any] = {
        "fastmask": fastmask.__version__,
        "model": model,
        "weights": None if weights is None else os.fspath(weights),
        "shards": os.fspath(shards),
        "fold": fold,
        "description": description,
        "threshold": threshold,
        "overall": {"n": len(y), "positives": n_pos, "auc": auc(y, p), "acc": acc(y, p, threshold=threshold),
                    "positive_rate": float((p > threshold).mean()), "label_positive_rate": float(y.mean())},
        "attributes": {},
        "preprocessing": resolved.record(),
        "data": {"samples": len(keys), "read": stats.samples, "skipped": stats.skipped},
        "loader": stats.to_dict(),
    }
    evaluation["warnings"] = [*resolved.warnings, *one_class_warning(evaluation["overall"], "the model")]
    for attr in names:
        raw = np.array([index.samples[k]["attrs"][attr] for k in got], dtype=object)
        try:
            raw = raw.astype(np.int64) if all(isinstance(v, int) for v in raw) else raw.astype(str)
        except (TypeError, ValueError):
            raw = raw.astype(str)
        res: dict[str, Any] = {"groups": group_rows(group_table(y, p, raw, threshold=threshold))}
        try:
            res["worst_group_auc"], res["auc_gap"] = worst_group_auc(y, p, raw), auc_gap(y, p, raw)
        except ValueError:  # no group holds both classes
            res["worst_group_auc"] = res["auc_gap"] = None
        groups = sorted(set(raw.tolist()))
        if len(groups) == 2:
            # The gaps are symmetric in the two groups, so which one is coded 1 does not matter.
            codes = (raw == groups[1]).astype(np.int64)
            res["gap_groups"] = groups
            res["gaps"] = {"eodds_mean": eodds(y, p, codes, definition="mean", threshold=threshold),
                           "eodds_max": eodds(y, p, codes, definition="max", threshold=threshold),
                           "eodds": eodds(y, p, codes, threshold=threshold),
                           "spd": spd(y, p, codes, threshold=threshold), "eopp": eopp(y, p, codes, threshold=threshold)}
        evaluation["attributes"][attr] = res
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation["outputs"] = write_evaluation(out, evaluation)
    return jsonable(evaluation)
