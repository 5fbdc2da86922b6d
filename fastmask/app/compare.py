"""``fastmask compare``: chosen methods over several seeds (or folds), a Table-1-style comparison, and a plot.

For every seed the data source gives a :class:`Fold` (the trained model every method starts from, fresh loaders of
D_e and D_r, and one or more test sets). Each method (:data:`fastmask.methods.registry.METHODS`) debiases a deep
copy of the model with the source's configuration for it, and is evaluated on every test set with
:func:`fastmask.fairness.metrics.evaluate` (AUC on p = σ(z), SPD and EOdds in the authors' code's definition on
ŷ = 1[p > 0.5], docs/algorithm.md §6). Over the seeds each figure is reported as mean ± std, the **sample**
standard deviation (ddof = 1), as the papers report 5-fold results.

Outputs, each written atomically into the output folder: ``table.md`` (the table printed), ``table.csv`` (means
and standard deviations as numbers), ``runs.csv`` (one row per method, seed and test set: the figures the table is
computed from) and ``scatter.png`` (fairness against AUC, one point per method with its ± std bars).

Data sources are pluggable (:class:`DataSource`, :data:`SOURCES`); the demo benchmark (:mod:`fastmask.app.demo`,
the tinted digits) is the one wired in.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from fastmask.app.plots import plot_compare
from fastmask.app.tables import markdown_table
from fastmask.fairness.metrics import evaluate
from fastmask.methods.baselines.ablations import HardMaskConfig, ManualMaskConfig, RandomMaskConfig
from fastmask.methods.baselines.finetune import LLFTConfig
from fastmask.methods.registry import HARD_FRACTIONS, METHODS
from fastmask.model.scoring import score
from fastmask.util.files import write_text

__all__ = ["Fold", "DataSource", "DemoSource", "SOURCES", "DEFAULT_METHODS", "TABLE_METRICS", "check_arguments",
           "compare", "summarise", "format_table", "main"]

DEFAULT_METHODS = ("baseline", "swift", "bmft", "fullft-fdr", "llft", "diffgda", "random-mask", "hard-0.5")
TABLE_METRICS = {"auc": "AUC", "spd": "SPD", "eodds": "EOdds"}
# Also kept per run (runs.csv, table.csv), not printed.
EXTRA_METRICS = ("acc", "eodds_max", "eodds_mean", "worst_group_auc")


@dataclass
class Fold:
    """One seed (or fold) of a benchmark.

    Attributes:
        model: the trained model every method starts from (each method gets a deep copy).
        loaders: returns fresh ``(mask_loader, train_loader)``: the unbalanced external set D_e and the group-balanced
            D_r. Called once per method, so that a method sees the same data order whichever methods run before it.
        test_sets: name -> loader of (x, y, a) batches.
    """

    model: nn.Module
    loaders: Callable[[], tuple[Iterable, Iterable]]
    test_sets: Mapping[str, Iterable]


class DataSource(Protocol):
    """Where the folds come from: ``fold(seed)`` and, per method, the configuration to run it with (None: the
    method's defaults)."""

    name: str
    description: str

    def fold(self, seed: int, *, progress: bool = False) -> Fold: ...

    def config(self, method: str) -> Any | None: ...


def _extend(cls: type, base: Any, **extra: Any) -> Any:
    """An instance of ``cls`` (a subclass of ``type(base)``'s dataclass) with ``base``'s fields plus ``extra``."""
    return cls(**{f.name: getattr(base, f.name) for f in fields(base)}, **extra)


class DemoSource:
    """The demo benchmark (:mod:`fastmask.app.demo`): per seed the tinted-digits splits, the biased ERM CNN, D_e / D_r
    loaders and the test split.

    Configurations: SWiFT and BMFT run with the demo's settings (``SWIFT_DEMO`` / ``BMFT_DEMO``); the mask ablations
    (random, hard at each fraction, manual) with the same settings, so that only the mask differs; LLFT with the
    demo's head step (Adam, lr 1e-2, 30 epochs, E in eval mode), the same as SWiFT's step 2. FullFT-*, DiffGda,
    DiffPrune and FairPrune run with their defaults (docs/algorithm.md §9 and the cited papers), untuned.
    """

    name = "demo"
    description = "tinted digits (label: digit >= 5; attribute: tint; fastmask demo)"

    def __init__(self, batch_size: int = 64) -> None:
        from fastmask.app import demo  # imported here: the demo pulls in scikit-learn's dataset loader

        self.demo = demo
        self.batch_size = batch_size
        self.configs: dict[str, Any] = {
            "swift": demo.SWIFT_DEMO,
            "bmft": demo.BMFT_DEMO,
            "random-mask": _extend(RandomMaskConfig, demo.SWIFT_DEMO),
            **{f"hard-{r:g}": _extend(HardMaskConfig, demo.SWIFT_DEMO, fraction=r) for r in HARD_FRACTIONS},
            "manual-bn": _extend(ManualMaskConfig, demo.BMFT_DEMO, kind="bn"),
            "manual-top": _extend(ManualMaskConfig, demo.BMFT_DEMO, kind="shallow_conv"),
            "llft": LLFTConfig(step=demo.SWIFT_DEMO.step2, feature_eval=True),
        }

    def fold(self, seed: int, *, progress: bool = False) -> Fold:
        from torch.utils.data import DataLoader

        splits, model = self.demo.prepare(seed, progress=progress)
        return Fold(model, lambda: self.demo.loaders(splits.external, seed, self.batch_size),
                    {"test": DataLoader(splits.test, batch_size=512)})

    def config(self, method: str) -> Any | None:
        return self.configs.get(method)


SOURCES: dict[str, Callable[[], DataSource]] = {"demo": DemoSource}
"""Data sources by ``--data`` name."""


def _with_seed(config: Any | None, seed: int) -> Any | None:
    if config is not None and "seed" in {f.name for f in fields(config)}:
        return replace(config, seed=seed)
    return config


def check_arguments(methods: Sequence[str] | None, seeds: Sequence[int], data: str | None = None) -> list[str]:
    """The methods to run (``None``: :data:`DEFAULT_METHODS`; ``"all"``: every method), after checking the method
    names, that the seeds are distinct and non-empty, and the data source name (when given)."""
    if data is not None and data not in SOURCES:
        raise ValueError(f"unknown data source {data!r}; choose from {list(SOURCES)}")
    chosen = list(methods or DEFAULT_METHODS)
    if "all" in chosen:
        chosen = list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {list(METHODS)} or 'all'")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"a method is listed twice in {chosen}")
    if not seeds:
        raise ValueError("compare needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    return chosen


def compare(source: DataSource, methods: Sequence[str], seeds: Sequence[int], *,
            progress: bool = False) -> list[dict[str, Any]]:
    """Run ``methods`` on ``source`` for every seed; one row per (method, seed, test set) with every metric of
    :func:`fastmask.metrics.evaluate`, ``seconds`` (the method's run time), ``guard_warnings`` (how often the guard
    warned) and ``collapses`` (how many of those were collapses to one class)."""
    check_arguments(methods, seeds)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(seeds) * len(methods), desc="compare", disable=not progress)
    for seed in seeds:
        fold = source.fold(seed, progress=progress)
        for method in methods:
            bar.set_postfix_str(f"seed {seed} {method}")
            model = copy.deepcopy(fold.model)
            mask_loader, train_loader = fold.loaders()
            # A method's default configuration seeds with 42 (the authors' constant): give it the run's seed.
            config = _with_seed(source.config(method) or METHODS[method].config(), seed)
            start = time.perf_counter()
            result = METHODS[method](model, mask_loader, train_loader, config=config, progress=False)
            seconds = time.perf_counter() - start
            for test_name, loader in fold.test_sets.items():
                metrics = evaluate(*score(model, loader)[:3])
                rows.append({"method": method, "label": METHODS[method].label, "seed": seed, "test_set": test_name,
                             **{k: metrics[k] for k in (*TABLE_METRICS, *EXTRA_METRICS)},
                             "seconds": seconds, "guard_warnings": len(result.guard_warnings),
                             "collapses": sum(w.kind == "collapse" for w in result.guard_warnings)})
            bar.update()
    bar.close()
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1; NaN for one seed) of every metric over the seeds, one row per
    (method, test set) in first-seen order. Columns ``<metric>_mean`` / ``<metric>_std``, ``n_seeds``,
    ``seconds_mean``, ``guard_warnings`` and ``collapses`` (totals)."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        raise ValueError("summarise: no rows")
    keys = ["method", "label", "test_set"]
    metrics = [*TABLE_METRICS, *EXTRA_METRICS]
    grouped = df.groupby(keys, sort=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out.insert(0, "n_seeds", grouped["seed"].nunique())
    out["seconds_mean"] = grouped["seconds"].mean()
    out["guard_warnings"] = grouped["guard_warnings"].sum()
    out["collapses"] = grouped["collapses"].sum()
    return out.reset_index()


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def format_table(summary: pd.DataFrame, title: str) -> str:
    """The Table-1-style markdown table: one row per method, AUC / SPD / EOdds as mean ± std per test set, the
    number of collapse-guard firings and the mean run time."""
    tests = list(dict.fromkeys(summary["test_set"]))
    header = ["Method"] + [f"{name} ({t})" for t in tests for name in TABLE_METRICS.values()] + ["collapse", "s"]
    rows = []
    for method in dict.fromkeys(summary["method"]):
        part = summary[summary["method"] == method].set_index("test_set")
        first = part.iloc[0]
        cells = [str(first["label"])]
        for t in tests:
            cells += [_cell(part.at[t, f"{m}_mean"], part.at[t, f"{m}_std"]) for m in TABLE_METRICS]
        cells += [f"{int(part['collapses'].iloc[0])}/{int(first['n_seeds'])}", f"{first['seconds_mean']:.1f}"]
        rows.append(cells)
    return f"{title}\n\n{markdown_table(header, rows)}"


def main(methods: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2), out: str | os.PathLike = "compare",
         data: str = "demo", json_path: str | os.PathLike | None = None, progress: bool = True,
         threads: int = 1) -> dict[str, Any]:
    """``fastmask compare``: run, write ``table.md``, ``table.csv``, ``runs.csv`` and ``scatter.png`` into ``out``,
    print the table, optionally write a JSON summary. ``methods`` may contain ``"all"``. ``threads`` as in
    :func:`fastmask.demo.main` (1 is the fastest for the demo's tiny CNN)."""
    chosen = check_arguments(methods, seeds, data)
    source = SOURCES[data]()
    wall = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = compare(source, chosen, list(seeds), progress=progress)
    finally:
        torch.set_num_threads(previous)
    wall = time.perf_counter() - wall
    summary = summarise(rows)
    n = len(seeds)
    title = (f"fastmask compare on {source.description}; seeds {' '.join(map(str, seeds))}; mean ± std "
             f"(sample std, n = {n}) over the seeds; EOdds = ½·|ΔFPR + ΔTPR| (the authors' code), SPD and EOdds at "
             "p > 0.5; collapse = collapse-guard firings / runs; s = mean seconds per run")
    table = format_table(summary, title)
    out_dir = Path(out)
    outputs = {"table_md": out_dir / "table.md", "table_csv": out_dir / "table.csv", "runs_csv": out_dir / "runs.csv",
               "plot": out_dir / "scatter.png"}
    write_text(outputs["table_md"], table + "\n")
    write_text(outputs["table_csv"], summary.to_csv(index=False))
    write_text(outputs["runs_csv"], pd.DataFrame(rows).to_csv(index=False))
    plot_compare(summary, outputs["plot"], f"fastmask compare: {source.description}, seeds {' '.join(map(str, seeds))}",
                 TABLE_METRICS)
    print(table)
    print(f"\nwrote {', '.join(str(p) for p in outputs.values())}")
    print(f"{wall:.1f} s")
    report = {"data": data, "seeds": list(seeds), "methods": chosen, "seconds": wall, "rows": rows,
              "summary": json.loads(summary.to_json(orient="records")),
              "outputs": {k: str(v) for k, v in outputs.items()}}
    if json_path is not None:
        write_text(Path(json_path), json.dumps(report, indent=2) + "\n")
    return report
