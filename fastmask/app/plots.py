"""The plots of ``fastmask debias`` and ``fastmask compare``, as PNG files written atomically (matplotlib's Agg
renderer through ``matplotlib.figure.Figure``: no display, no global figure registry):

- :func:`plot_mask_layers`: the mask per layer, like SWiFT's Fig. 8: one box per layer (module) over its parameters'
  mask values -- box = quartiles, line = median, whiskers = 5th and 95th percentiles, dot = mean -- or, for a hard
  (BMFT) mask, the fraction of each layer selected for fine-tuning.
- :func:`plot_epochs`: AUC and fairness gaps on the evaluation set after every epoch, like SWiFT's Fig. 4.
- :func:`plot_compare`: fairness against AUC, one point per method with ± std bars.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fastmask.app.tables import METRIC_NAMES
from fastmask.util.files import atomic_write_bytes


def _figure(width: float, height: float):
    # matplotlib.figure.Figure directly (no pyplot): no global figure registry, no GUI backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def plot_mask_layers(stats: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, hard: bool,
                     title: str = "") -> None:
    """The mask per layer (SWiFT Fig. 8): boxes of the soft-mask values, or bars of a hard mask's selected
    fraction; head layers in orange."""
    n = len(stats)
    fig = _figure(max(7.0, 0.18 * n + 2.0), 4.5)
    ax = fig.add_subplot()
    colours = ["tab:orange" if s["head"] else "tab:blue" for s in stats]
    x = np.arange(1, n + 1)
    if hard:
        ax.bar(x, [s["mean"] for s in stats], color=colours)
        ax.set_ylabel("fraction selected (M = 1)")
    else:
        boxes = [{"label": s["layer"], "med": s["median"], "q1": s["q25"], "q3": s["q75"], "whislo": s["q05"],
                  "whishi": s["q95"], "mean": s["mean"]} for s in stats]
        art = ax.bxp(boxes, positions=x, showfliers=False, showmeans=True, patch_artist=True, widths=0.6,
                     meanprops={"marker": ".", "markerfacecolor": "black", "markeredgecolor": "black"},
                     medianprops={"color": "black"})
        for patch, colour in zip(art["boxes"], colours, strict=True):
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        ax.set_ylabel("soft mask M = tanh(R)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x, [s["layer"] for s in stats], rotation=90, fontsize=7)
    ax.set_xlim(0.3, n + 0.7)
    ax.set_xlabel("layer (head in orange)")
    ax.set_title(title or ("hard mask per layer" if hard else
                           "soft mask per layer (box: quartiles, whiskers: 5th-95th percentile, dot: mean)"))
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path)


def plot_epochs(epochs: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """AUC (overall, worst group) and fairness gaps (EOdds code, SPD, EOpp) on the evaluation set after each epoch
    (SWiFT Fig. 4); ``epochs`` starts with the model before debiasing (``step == "before"``)."""
    labels = ["before" if e["step"] == "before" else f"{e['step']}:{e['epoch']}" for e in epochs]
    x = np.arange(len(epochs))
    fig = _figure(max(6.0, 0.35 * len(epochs) + 3.0), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, keys in ((top, ("auc", "worst_group_auc")), (bottom, ("eodds", "spd", "eopp"))):
        for key in keys:
            ax.plot(x, [e.get(key, math.nan) if e.get(key) is not None else math.nan for e in epochs],
                    marker="o", ms=3, label=METRIC_NAMES[key])
        # A dashed line where a new step starts.
        for i in range(1, len(epochs)):
            if epochs[i]["step"] != epochs[i - 1]["step"] and epochs[i - 1]["step"] != "before":
                ax.axvline(i - 0.5, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("AUC")
    bottom.set_ylabel("fairness gap")
    bottom.set_xticks(x, labels, rotation=90, fontsize=7)
    bottom.set_xlabel("after epoch (step:epoch)")
    top.set_title(title or "evaluation set after each epoch")
    _save_png(fig, path)


# ---- debias report ------------------------------------------------------------------------------------------------


# Marker x colour pairs stay distinct for 60 methods (lcm of 12 markers and 10 colours).
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "d")
# The zoomed panel shows the methods whose mean AUC is within this distance of the best one.
ZOOM_AUC = 0.02


def plot_compare(summary: pd.DataFrame, path: str | os.PathLike, title: str) -> None:
    """The fairness gap against AUC: per test set, EOdds in its mean and max forms (y, lower is fairer) against AUC
    (x), one point per method with ± std error bars, and the mean form zoomed on the methods within ``ZOOM_AUC`` of
    the best mean AUC (where the competitive methods crowd). Each method has its own marker and colour, the Baseline
    a star. The signed sum is not plotted: opposite gaps cancel in it."""
    tests = list(dict.fromkeys(summary["test_set"]))
    methods = list(dict.fromkeys(summary["method"]))
    style = {m: ("*", "C0", 13) if m == "baseline" else (_MARKERS[i % len(_MARKERS)], f"C{i % 10}", 7)
             for i, m in enumerate(methods)}
    fig = _figure(18, 5.5 * len(tests))
    axes = fig.subplots(len(tests), 3, squeeze=False)
    for row, test in zip(axes, tests, strict=True):
        part = summary[summary["test_set"] == test]
        best = part["auc_mean"].max()
        near = part[part["auc_mean"] >= best - ZOOM_AUC]
        panels = (("eodds_mean", part, "all methods"), ("eodds_max", part, "all methods"),
                  ("eodds_mean", near, f"zoom: AUC within {ZOOM_AUC} of the best"))
        for ax, (metric, shown, what) in zip(row, panels, strict=True):
            for _, r in shown.iterrows():
                marker, colour, size = style[r["method"]]
                ax.errorbar(r["auc_mean"], r[f"{metric}_mean"], xerr=_nan0(r["auc_std"]),
                            yerr=_nan0(r[f"{metric}_std"]), fmt=marker, color=colour, markersize=size, capsize=2,
                            elinewidth=0.8, alpha=0.9, label=r["label"])
            ax.set_xlabel("AUC (higher is better)")
            ax.set_ylabel(f"{METRIC_NAMES[metric]} (lower is fairer)")
            ax.set_title(f"{METRIC_NAMES[metric]} vs AUC, {test} ({what})")
            ax.grid(alpha=0.3)
        handles, labels = row[0].get_legend_handles_labels()
        row[2].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    _save_png(fig, path)


def _nan0(x: float) -> float:
    return 0.0 if pd.isna(x) else float(x)


def plot_selection(selection: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Every candidate and epoch of a selection (:meth:`fastmask.methods.selection.Selection.to_dict`) on the
    validation part: the rule's fairness gap (y) against AUC (x), one colour per candidate, admissible epochs filled
    and the others hollow, the chosen one a star, the original model a black diamond (at 0.5) and a grey one (at the
    rule's threshold: candidate zero), and the AUC budget as a dashed line (admissible epochs also meet the accuracy,
    share and gap conditions, which the marker shows, not the axes)."""
    rule, original, rows = selection["rule"], selection["original"], selection["rows"]
    gap = rule["gap"]
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    for i, _ in enumerate(selection["candidates"]):
        mine = [r for r in rows if r["candidate"] == i]
        for admissible in (True, False):
            pts = [r for r in mine if r["admissible"] is admissible]
            if pts:
                ax.scatter([r["auc"] for r in pts], [r[gap] for r in pts], s=22, color=f"C{i % 10}",
                           facecolors=f"C{i % 10}" if admissible else "none",
                           label=f"candidate {i}" if admissible or not any(r["admissible"] for r in mine) else None)
    ax.scatter([original["auc"]], [original[gap]], marker="D", color="black", s=50, label="original (0.5)", zorder=3)
    for r in rows:
        if r["candidate"] is None:  # candidate zero: the original weights at the rule's threshold
            ax.scatter([r["auc"]], [r[gap]], marker="D", color="grey", facecolors="grey" if r["admissible"] else "none",
                       s=50, label=f"original ({r['threshold']:.3f})", zorder=3)
    if selection["chosen"] is not None:
        c = selection["chosen"]
        ax.scatter([c["auc"]], [c[gap]], marker="*", color="gold", edgecolors="black", s=260, zorder=4,
                   label="chosen")
    ax.axvline(original["auc"] - rule["max_auc_drop"], color="grey", ls="--", lw=1,
               label=f"AUC budget (−{rule['max_auc_drop']})")
    ax.set_xlabel("validation AUC")
    ax.set_ylabel(f"validation {METRIC_NAMES.get(gap, gap)} (lower is fairer)")
    ax.set_title(title or "selection on the validation part")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save_png(fig, path)
