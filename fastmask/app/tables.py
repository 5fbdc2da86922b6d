"""Markdown tables, the one formatter that every table fastmask prints or writes goes through (``report.md``,
``metrics.md``, the compare and demo tables), the metric names they use, and the headline every summary shows.

The headline never shows a fairness figure alone: AUC, accuracy and the share of positive predictions (beside the
label rate) come with the equalised-odds gap in its mean and max forms and, after them, the signed sum the authors'
code reports, in which opposite TPR and FPR gaps cancel."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fastmask.util.files import jsonable

# The scalar metrics of fastmask.fairness.metrics.evaluate in report order, with their table names.
METRIC_NAMES = {
    "auc": "AUC",
    "acc": "ACC",
    "positive_rate": "positive share",
    "label_positive_rate": "label rate",
    "eodds_mean": "EOdds (mean)",
    "eodds_max": "EOdds (max)",
    "eodds": "EOdds (code, signed sum)",
    "spd": "SPD",
    "eopp": "EOpp",
    "worst_group_auc": "worst-group AUC",
    "auc_gap": "AUC gap",
    "threshold": "decision threshold",
}
#: The headline: what every summary shows, in this order.
HEADLINE = ("auc", "acc", "positive_rate", "eodds_mean", "eodds_max", "eodds")
GROUP_COLUMNS = ("n", "positives", "auc", "acc", "tpr", "fpr", "positive_rate")


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub markdown table; floats with ``digits`` decimals, missing values as an en dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def group_rows(table: pd.DataFrame, labels: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """Rows of :func:`fastmask.fairness.metrics.group_table` as dicts with a ``group`` entry (and ``label`` if
    named)."""
    rows = []
    for i, group in enumerate(table.index):
        rec: dict[str, Any] = {"group": jsonable(group)}
        if labels and group in labels:
            rec["label"] = labels[group]
        # Column by column (iterrows would turn the integer counts into floats).
        rec.update({c: jsonable(table[c].iloc[i]) for c in GROUP_COLUMNS})
        rows.append(rec)
    return rows


# ---- the mask per layer -------------------------------------------------------------------------------------------


def headline(before: Mapping[str, Any], after: Mapping[str, Any] | None = None) -> str:
    """One line: AUC, ACC, positive share (with the label rate), EOdds mean / max / code, as ``before -> after``
    when ``after`` is given."""
    def pair(key: str, digits: int = 4) -> str:
        b = f"{before[key]:.{digits}f}"
        return b if after is None else f"{b} -> {after[key]:.{digits}f}"

    return (f"AUC {pair('auc')}, ACC {pair('acc')}, positive share {pair('positive_rate', 3)} (labels "
            f"{before['label_positive_rate']:.3f}), EOdds mean {pair('eodds_mean')}, max {pair('eodds_max')}, code "
            f"(signed sum) {pair('eodds')}")
