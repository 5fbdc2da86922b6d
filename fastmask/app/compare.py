"""``fastmask compare``: methods side by side over several seeds, each tuned the same way, on the demo benchmark or
on the user's own model and shards; a comparison table with mean ± std, and a plot.

For every seed the data source gives a :class:`Fold`: the trained model every method starts from, fresh loaders of
the external set and one or more test sets. By default every method is **selected** on a validation part held out
of the external set (:func:`fastmask.methods.selection.select`): each tries its own grid of
:data:`~fastmask.methods.grids.GRID_SIZE` candidates (the Baseline, with nothing to tune, runs once) under the same
:class:`~fastmask.methods.selection.SelectionRule`, so every method gets the same tuning budget and the same budgets
on AUC, accuracy and the positive share; a method none of whose candidates meets them leaves the model unchanged,
and the table counts it. Every selection also judges the original weights at a chosen threshold (candidate zero): a
method that cannot beat moving the threshold reports "threshold only"; the row ``threshold`` shows that option
alone, and the Baseline is the original model at the threshold 0.5. With
``rule=None`` (``--select none``) every method runs once with the source's configuration for it (None: its defaults),
on all of the external set, at the threshold 0.5.

Each debiased model is evaluated on every test set with :func:`fastmask.fairness.metrics.evaluate` at its
selected decision threshold. The table shows, per test set, the headline of :mod:`fastmask.app.tables`: AUC, ACC,
the share of positive predictions and the equalised-odds gap in its mean and max forms beside the authors' code's
signed sum; each figure the mean ± the **sample** standard deviation (ddof = 1) over the seeds.

Outputs, each written atomically into the output folder: ``table.md`` (the table printed), ``table.csv`` (means and
standard deviations as numbers), ``runs.csv`` (one row per method, seed and test set: the figures the table is
computed from, with the chosen candidate) and ``scatter.png`` (the gap against AUC, one point per method with ± std
bars).

Data sources (:class:`DataSource`): :class:`DemoSource`, the tinted digits of ``fastmask demo`` (the default), and
:class:`ShardSource`, a model and shards as ``fastmask debias`` reads them.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from fastmask.app.cli import COMPARE_DEFAULTS
from fastmask.app.plots import plot_compare
from fastmask.app.report import preprocessing_text
from fastmask.app.sets import (
    SPLITS,
    DataSpec,
    Tracked,
    decoded_caches,
    loader_summary,
    parts,
    read_sets,
    split_counts,
)
from fastmask.app.tables import HEADLINE, METRIC_NAMES, markdown_table
from fastmask.fairness.metrics import evaluate
from fastmask.methods.registry import METHODS
from fastmask.methods.selection import SelectionRule, select
from fastmask.model.scoring import score
from fastmask.model.weights import Library, load_model
from fastmask.util.files import write_text

__all__ = ["Fold", "DataSource", "DemoSource", "ShardSource", "DEFAULT_METHODS", "TABLE_METRICS",
           "check_methods", "compare", "summarise", "format_table", "main"]

#: The methods compared when none are named (the command line's list, which its --help prints).
DEFAULT_METHODS = COMPARE_DEFAULTS
#: The table's figures per test set: the headline (AUC, ACC, positive share, EOdds mean / max / signed sum).
TABLE_METRICS = {k: METRIC_NAMES[k] for k in HEADLINE}
#: The rule every method is selected by unless the caller gives another (or None: no selection).
DEFAULT_RULE = SelectionRule()
# Also kept per run (runs.csv, table.csv), not printed.
EXTRA_METRICS = ("label_positive_rate", "spd", "eopp", "worst_group_auc", "threshold")


@dataclass
class Fold:
    """One seed of a benchmark.

    Attributes:
        model: the trained model every method starts from (each method gets a deep copy).
        loaders: ``loaders(hold_out)`` returns fresh ``(mask_loader, train_loader, val_loader)``: the unbalanced
            external set D_e and the group-balanced D_r drawn from it, both without a validation part held out of
            D_e when ``hold_out`` (then ``val_loader`` reads that part; else it is None). Called once per method,
            so that a method sees the same data whichever methods run before it.
        test_sets: name -> loader of (x, y, a) batches.
    """

    model: nn.Module
    loaders: Callable[[bool], tuple[Iterable, Iterable, Iterable | None]]
    test_sets: Mapping[str, Iterable]


class DataSource(Protocol):
    """Where the folds come from: ``fold(seed)`` and, per method, the configuration to start from (None: the
    method's defaults); ``skipped()`` counts the damaged sample reads its loaders skipped so far, ``reads()`` what
    the last epoch over each split read and skipped (:func:`fastmask.app.sets.split_counts`; empty when nothing is
    read from shards); ``preprocessing`` the record of the images' preprocessing (None when not from shards)."""

    name: str
    description: str
    preprocessing: dict[str, Any] | None

    def fold(self, seed: int, *, progress: bool = False) -> Fold: ...

    def config(self, method: str) -> Any | None: ...

    def skipped(self) -> int: ...

    def reads(self) -> dict[str, dict[str, int]]: ...


class DemoSource:
    """The demo benchmark (:mod:`fastmask.app.demo`): per seed the tinted-digits splits, the biased ERM CNN, the
    external set's loaders (:func:`fastmask.app.demo.parts`) and the test split. Every method starts from its
    default configuration."""

    name = "demo"
    description = "tinted digits (label: digit >= 5; attribute: tint; fastmask demo)"
    preprocessing = None

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.25) -> None:
        from fastmask.app import demo  # imported here: the demo pulls in scikit-learn's dataset loader

        self.demo, self.batch_size, self.val_fraction = demo, batch_size, val_fraction

    def fold(self, seed: int, *, progress: bool = False) -> Fold:
        splits, model = self.demo.prepare(seed, progress=progress)

        def loaders(hold_out: bool) -> tuple[Iterable, Iterable, Iterable | None]:
            return self.demo.parts(splits.external, seed, self.val_fraction if hold_out else 0.0, self.batch_size)

        test = self.demo.stream(splits.test_shards, seed, batch_size=512, shuffle=False)
        return Fold(model, loaders, {"test": test})

    def config(self, method: str) -> Any | None:
        return None

    def skipped(self) -> int:
        return 0

    def reads(self) -> dict[str, dict[str, int]]:
        return {}


class ShardSource:
    """A model and shards, read as ``fastmask debias`` reads them (:mod:`fastmask.app.sets`): per seed the same
    trained model, D_e split (when selecting) and balanced with that seed, and the evaluation set as the test set.
    The seeds vary the validation part, D_r, the shuffling and the methods' own seeds."""

    name = "shards"

    def __init__(self, *, model: str, weights: str | os.PathLike, data: DataSpec, trust_pickle: bool = False,
                 library: Library = "auto", device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model, weights, trust_pickle=trust_pickle, library=library).to(self.device)
        self.data, resolved = data.resolve(self.model)
        self.preprocessing = resolved.record()
        self.sets = read_sets(self.data, self.model, self.device)
        # Every method and seed reads the same images: decoded once for the whole comparison.
        self.caches = decoded_caches(self.sets, self.data)
        self.description = (f"{model} on {data.shards} (attribute {data.attr!r}; test: "
                            f"{self.sets.descriptions['test']})")
        self.loader_log: list[dict[str, Any]] = []

    def fold(self, seed: int, *, progress: bool = False) -> Fold:
        data = replace(self.data, seed=seed)

        def loaders(hold_out: bool) -> tuple[Iterable, Iterable, Iterable | None]:
            p = parts(self.sets, data, hold_out=hold_out, caches=self.caches)
            limit = data.max_skip_fraction
            val = None if p.validation is None else Tracked(p.validation, "validation", self.loader_log, limit)
            return (Tracked(p.mask, "mask", self.loader_log, limit), Tracked(p.train, "train", self.loader_log, limit),
                    val)

        test = Tracked(parts(self.sets, data, hold_out=False, caches=self.caches).evaluation, "evaluation",
                       self.loader_log, data.max_skip_fraction)
        return Fold(self.model, loaders, {"test": test})

    def config(self, method: str) -> Any | None:
        return None

    def skipped(self) -> int:
        return loader_summary(self.loader_log)["skipped"]

    def reads(self) -> dict[str, dict[str, int]]:
        return split_counts(self.loader_log)


def _with_seed(config: Any, seed: int) -> Any:
    if "seed" in {f.name for f in fields(config)}:
        return replace(config, seed=seed)
    return config


def check_methods(methods: Sequence[str] | None, seeds: Sequence[int]) -> list[str]:
    """The methods to run (``None``: :data:`DEFAULT_METHODS`; ``"all"``: every method), after checking the method
    names and that the seeds are distinct and non-empty."""
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


def _run(method: str, model: nn.Module, fold: Fold, config: Any, rule: SelectionRule | None,
         progress: bool) -> dict[str, Any]:
    """Debias ``model`` in place with ``method`` (selected by ``rule``, or run once); what the run row records."""
    tune = rule is not None and not METHODS[method].reference  # the Baseline is the untouched model at 0.5
    mask_loader, train_loader, val_loader = fold.loaders(tune)
    if not tune:
        result = METHODS[method](model, mask_loader, train_loader, config=config, progress=progress)
        return {"threshold": 0.5, "chosen": "fixed", "unchanged": False, "warnings": result.guard_warnings}
    sel = select(model, method, mask_loader, train_loader, val_loader, config=config, rule=rule, progress=progress)
    return {"threshold": sel.threshold, "chosen": sel.describe_choice(), "unchanged": sel.chosen is None,
            "warnings": sel.result.guard_warnings if sel.result is not None else []}


def compare(source: DataSource, methods: Sequence[str], seeds: Sequence[int], *,
            rule: SelectionRule | None = DEFAULT_RULE, progress: bool = False) -> list[dict[str, Any]]:
    """Run ``methods`` on ``source`` for every seed, each selected by ``rule`` (None: run once); one row per
    (method, seed, test set) with every metric of :func:`fastmask.fairness.metrics.evaluate` at the method's
    decision threshold, ``chosen`` (the selected candidate and epoch), ``unchanged`` (no candidate met the budgets),
    ``seconds`` (the method's run or selection time), ``guard_warnings`` (how often the guard warned in the chosen
    run) and ``collapses`` (how many of those were collapses to one class)."""
    check_methods(methods, seeds)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(seeds) * len(methods), desc="compare", disable=not progress)
    for seed in seeds:
        fold = source.fold(seed, progress=progress)
        for method in methods:
            bar.set_postfix_str(f"seed {seed} {method}")
            model = copy.deepcopy(fold.model)
            # A method's default configuration seeds with 42 (the authors' constant): give it the run's seed.
            config = _with_seed(source.config(method) or METHODS[method].config(), seed)
            start = time.perf_counter()
            run = _run(method, model, fold, config, rule, progress=False)
            seconds = time.perf_counter() - start
            for test_name, loader in fold.test_sets.items():
                s = score(model, loader)
                metrics = evaluate(s.y, s.p, s.a, threshold=run["threshold"])
                rows.append({"method": method, "label": METHODS[method].label, "seed": seed, "test_set": test_name,
                             **{k: metrics[k] for k in (*TABLE_METRICS, *EXTRA_METRICS)},
                             "chosen": run["chosen"], "unchanged": run["unchanged"], "seconds": seconds,
                             "guard_warnings": len(run["warnings"]),
                             "collapses": sum(w.kind == "collapse" for w in run["warnings"])})
            bar.update()
    bar.close()
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1; NaN for one seed) of every metric over the seeds, one row per
    (method, test set) in first-seen order. Columns ``<metric>_mean`` / ``<metric>_std``, ``n_seeds``,
    ``seconds_mean``, and the totals ``unchanged``, ``guard_warnings`` and ``collapses``."""
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
    for total in ("unchanged", "guard_warnings", "collapses"):
        out[total] = grouped[total].sum().astype(int)
    return out.reset_index()


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def format_table(summary: pd.DataFrame, title: str) -> str:
    """The comparison as a markdown table: one row per method; per test set the headline figures as mean ± std;
    then how many seeds left the model unchanged (no candidate within the budgets), the collapse-guard firings
    and the mean run time."""
    tests = list(dict.fromkeys(summary["test_set"]))
    header = (["Method"] + [f"{name} ({t})" for t in tests for name in TABLE_METRICS.values()]
              + ["unchanged", "collapse", "s"])
    rows = []
    for method in dict.fromkeys(summary["method"]):
        part = summary[summary["method"] == method].set_index("test_set")
        first = part.iloc[0]
        cells = [str(first["label"])]
        for t in tests:
            cells += [_cell(part.at[t, f"{m}_mean"], part.at[t, f"{m}_std"]) for m in TABLE_METRICS]
        n = int(first["n_seeds"])
        cells += [f"{int(first['unchanged'])}/{n}", f"{int(first['collapses'])}/{n}", f"{first['seconds_mean']:.1f}"]
        rows.append(cells)
    return f"{title}\n\n{markdown_table(header, rows)}"


def main(source: DataSource, methods: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
         out: str | os.PathLike = "compare", rule: SelectionRule | None = DEFAULT_RULE,
         json_path: str | os.PathLike | None = None, progress: bool = True,
         threads: int | None = None) -> dict[str, Any]:
    """``fastmask compare``: run, write ``table.md``, ``table.csv``, ``runs.csv`` and ``scatter.png`` into ``out``,
    print the table, optionally write a JSON summary. ``methods`` may contain ``"all"``. ``threads`` sets torch's
    intra-op threads for the run (restored afterwards; None leaves them; 1 is the fastest for the demo's tiny CNN,
    and makes its numbers independent of the machine's core count)."""
    chosen = check_methods(methods, seeds)
    wall = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        rows = compare(source, chosen, list(seeds), rule=rule, progress=progress)
    finally:
        torch.set_num_threads(previous)
    wall = time.perf_counter() - wall
    summary = summarise(rows)
    tuning = ("each method selected on a validation part of the external set (its own grid, the same rule: "
              f"{rule.gap} smallest within AUC −{rule.max_auc_drop}, ACC −{rule.max_acc_drop}, positive share "
              f"±{rule.share_tolerance} of the label rate; threshold {rule.threshold!r})" if rule is not None
              else "each method run once with its default configuration, threshold 0.5")
    title = (f"fastmask compare on {source.description}; seeds {' '.join(map(str, seeds))}; {tuning}; mean ± std "
             f"(sample std, n = {len(seeds)}) over the seeds; EOdds (mean) = ½(|ΔTPR| + |ΔFPR|), (max) = "
             "max(|ΔTPR|, |ΔFPR|), (code) = ½·|ΔTPR + ΔFPR| (the authors' code: opposite gaps cancel); unchanged = "
             "seeds where no candidate met the budgets; collapse = collapse-guard firings / runs; s = mean seconds")
    table = format_table(summary, title)
    skipped, reads = source.skipped(), source.reads()
    if source.preprocessing is not None:
        table += f"\n\nPreprocessing: {preprocessing_text(source.preprocessing)}."
        for w in source.preprocessing["warnings"]:
            table += f"\n\n**Warning:** {w}."
    if reads:
        table += ("\n\nSamples read in the last epoch over each split: " + "; ".join(
            f"{SPLITS[name]} {c['read']} ({c['skipped']} skipped as damaged)" for name, c in reads.items()) + ".")
    out_dir = Path(out)
    outputs = {"table_md": out_dir / "table.md", "table_csv": out_dir / "table.csv", "runs_csv": out_dir / "runs.csv",
               "plot": out_dir / "scatter.png"}
    write_text(outputs["table_md"], table + "\n")
    write_text(outputs["table_csv"], summary.to_csv(index=False))
    write_text(outputs["runs_csv"], pd.DataFrame(rows).to_csv(index=False))
    plot_compare(summary, outputs["plot"], f"fastmask compare: {source.description}, seeds {' '.join(map(str, seeds))}")
    print(table)
    if skipped:
        print(f"\nskipped {skipped} damaged sample reads (over every pass of every loader; --strict fails instead)")
    print(f"\nwrote {', '.join(str(p) for p in outputs.values())}")
    print(f"{wall:.1f} s")
    report = {"data": source.name, "description": source.description, "seeds": list(seeds), "methods": chosen,
              "rule": None if rule is None else asdict(rule), "seconds": wall, "skipped": skipped, "reads": reads,
              "preprocessing": source.preprocessing,
              "rows": rows,
              "summary": json.loads(summary.to_json(orient="records")),
              "outputs": {k: str(v) for k, v in outputs.items()}}
    if json_path is not None:
        write_text(Path(json_path), json.dumps(report, indent=2) + "\n")
    return report
