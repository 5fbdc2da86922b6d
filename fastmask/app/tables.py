"""Markdown tables, the one formatter that every table fastmask prints or writes goes through (``report.md``,
``metrics.md``, the compare and demo tables), and the metric names they use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fastmask.util.files import jsonable

# The scalar metrics of fastmask.metrics.evaluate in report order, with their table names.
METRIC_NAMES = {
    "auc": "AUC",
    "acc": "ACC",
    "spd": "SPD",
    "eopp": "EOpp",
    "eodds": "EOdds (code)",
    "eodds_max": "EOdds (max)",
    "eodds_mean": "EOdds (mean)",
    "worst_group_auc": "worst-group AUC",
    "auc_gap": "AUC gap",
    "positive_rate": "positive rate",
    "label_positive_rate": "label positive rate",
}
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
