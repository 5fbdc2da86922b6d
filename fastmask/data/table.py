"""The metadata table of an image set (CSV or parquet: image path, binary label, attribute columns, optional fold and
key columns): reading it, checking it (every error names the column and the row), and the sample keys the shards use.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# A key becomes a tar member name "<key>.<ext>": webdataset splits a member name at the first "." of its basename,
# so a key must not hold "." or "/"; USTAR names are limited to 100 bytes.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@,]{1,80}$")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a metadata table with pandas: ``.csv`` / ``.csv.gz`` / ``.tsv`` or ``.parquet`` / ``.pq``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata table not found: {path}")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    if name.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t")
    raise ValueError(f"metadata table {path}: unknown format (expected .csv, .csv.gz, .tsv, .parquet or .pq)")


def _json_scalar(value: Any, what: str) -> int | float | str:
    """A table cell as a JSON scalar: integral numbers become int, so attribute 1.0 and 1 are the same group."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{what} is NaN")
        if math.isinf(value):
            raise ValueError(f"{what} is infinite")
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return value
    raise ValueError(f"{what} has unsupported type {type(value).__name__} (value {value!r})")


def row_name(pos: int, source: str | None) -> str:
    # For a CSV the user opens in an editor, the line number is what they look for (header = line 1).
    if source is not None and source.lower().endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        return f"row {pos} (line {pos + 2} of {source})"
    return f"row {pos}"


def sample_keys(table: pd.DataFrame, key_col: str | None = None) -> list[str]:
    """The stable, unique key of every row: the row position zero-padded to 8 digits, or ``key_col`` as text.

    Keys name tar members, so a user key must match ``[A-Za-z0-9_-:+=@,]{1,80}`` (no "." and no "/").
    """
    n = len(table)
    if key_col is None:
        width = max(8, len(str(max(n - 1, 0))))
        return [f"{i:0{width}d}" for i in range(n)]
    if key_col not in table.columns:
        raise ValueError(f"key column {key_col!r} not in the table (columns: {list(table.columns)})")
    keys: list[str] = []
    first: dict[str, int] = {}
    for pos, value in enumerate(table[key_col].tolist()):
        key = str(value)
        if not _KEY_RE.match(key):
            raise ValueError(
                f"column {key_col!r} {row_name(pos, None)}: key {key!r} is not usable as a tar member name "
                "(1-80 characters from A-Z a-z 0-9 _ - : + = @ ,)"
            )
        if key in first:
            raise ValueError(f"column {key_col!r}: key {key!r} appears in row {first[key]} and row {pos}")
        first[key] = pos
        keys.append(key)
    return keys


def check_table(
    table: pd.DataFrame,
    *,
    image_col: str,
    label_col: str,
    attr_cols: Sequence[str],
    fold_col: str | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """Validate a metadata table and return one JSON-ready record per row (label, attrs, fold, row, path).

    Errors name the column and the row: a missing column, an empty or non-text image path, a label that is not
    binary (0 / 1, as int, float or bool; the value is named), an attribute or fold value that is NaN.
    """
    if isinstance(attr_cols, str):
        attr_cols = [attr_cols]
    if not attr_cols:
        raise ValueError("attr_cols: at least one attribute column is required")
    needed = {"image_col": image_col, "label_col": label_col}
    needed.update({f"attr_cols[{i}]": c for i, c in enumerate(attr_cols)})
    if fold_col is not None:
        needed["fold_col"] = fold_col
    missing = [f"{arg}={col!r}" for arg, col in needed.items() if col not in table.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}; the table has columns {list(table.columns)}")
    if len(table) == 0:
        raise ValueError("the metadata table has no rows")

    labels = table[label_col].tolist()
    paths = table[image_col].tolist()
    attrs = {c: table[c].tolist() for c in attr_cols}
    folds = table[fold_col].tolist() if fold_col is not None else None
    row_labels = table.index.tolist()
    records: list[dict[str, Any]] = []
    for pos in range(len(table)):
        where = row_name(pos, source)
        path = paths[pos]
        if path is None or (isinstance(path, float) and math.isnan(path)) or path == "":
            raise ValueError(f"column {image_col!r} {where}: image path is missing")
        if not isinstance(path, str):
            raise ValueError(f"column {image_col!r} {where}: image path {path!r} is not a string")
        try:
            label = _json_scalar(labels[pos], "label")
        except ValueError as err:
            raise ValueError(f"column {label_col!r} {where}: {err}") from None
        if isinstance(label, str) or label not in (0, 1):
            raise ValueError(f"column {label_col!r} {where}: label {labels[pos]!r} is not binary (0 or 1)")
        rec_attrs = {}
        for col in attr_cols:
            try:
                rec_attrs[col] = _json_scalar(attrs[col][pos], "attribute value")
            except ValueError as err:
                raise ValueError(f"column {col!r} {where}: {err}") from None
        fold = None
        if folds is not None:
            try:
                fold = _json_scalar(folds[pos], "fold")
            except ValueError as err:
                raise ValueError(f"column {fold_col!r} {where}: {err}") from None
        try:
            row = _json_scalar(row_labels[pos], "row label")
        except ValueError:
            row = str(row_labels[pos])
        records.append({"label": int(label), "attrs": rec_attrs, "fold": fold, "row": row, "path": path})
    return records
