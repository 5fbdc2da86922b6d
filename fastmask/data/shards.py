"""Metadata table + image root -> WebDataset tar shards, with a key -> shard index.

A shard holds, per sample, two members named by the sample's key: ``<key>.<ext>`` (the image file's bytes,
unchanged, under its own lower-cased extension) and ``<key>.json`` (label, attributes, fold, source row and path).
Writing is deterministic: the same table and images give byte-identical shards and index, because members are
written in table order with fixed tar metadata (mtime 0, uid/gid 0, fixed user/group names and mode).

The index ``<prefix>-index.json`` beside the shards maps every key to its shard and metadata and lists the sample
count and size of every shard; the loader plans per-rank and per-worker splits from it without opening a tar.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from fastmask.data.table import check_table, read_table, row_name, sample_keys
from fastmask.data.tar import TarFormatError, iter_tar_members
from fastmask.util.files import atomic_write_bytes

#: Image extensions the writer accepts and the loader decodes (with PIL).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "ppm", "pgm")
#: The index file is ``<prefix><INDEX_SUFFIX>`` in the shard directory.
INDEX_SUFFIX = "-index.json"
_INDEX_FORMAT = "fastmask.shards"
_INDEX_VERSION = 1
# Fixed tar header fields: nothing in a shard depends on the clock or on who wrote it.
_TAR_META = {"mtime": 0, "user": "fastmask", "group": "fastmask", "mode": 0o444}


@dataclass(frozen=True)
class ShardInfo:
    """One shard: file name (relative to the index's directory), sample count, file size in bytes."""

    name: str
    count: int
    bytes: int


@dataclass
class ShardIndex:
    """The index of a shard set: every key's shard and metadata, in write order, and every shard's size.

    Args:
        root: directory holding the shards (shard names are relative to it).
        shards: the shards in write order.
        samples: key -> {"shard", "label", "attrs", "fold", "row", "path"}, in write order.
        columns: the table's column names ({"image", "label", "attrs", "fold", "key"}), for reports.
        damage: what :meth:`scan` could not read, as {"shard", "key", "reason", "detail"} records (the loader
            counts them as skipped); empty for an index written by :func:`write_shards`.
    """

    root: Path
    shards: list[ShardInfo]
    samples: dict[str, dict[str, Any]]
    columns: dict[str, Any] = field(default_factory=dict)
    damage: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def urls(self) -> list[str]:
        """Paths of the shards, in write order."""
        return [str(self.root / s.name) for s in self.shards]

    @property
    def attr_cols(self) -> list[str]:
        """Attribute names present in every sample's metadata."""
        if self.columns.get("attrs"):
            return list(self.columns["attrs"])
        names: set[str] | None = None
        for rec in self.samples.values():
            names = set(rec["attrs"]) if names is None else names & set(rec["attrs"])
        return sorted(names or ())

    def shard_of(self, key: str) -> str:
        """The name of the shard that holds ``key``."""
        try:
            return self.samples[key]["shard"]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the shard index under {self.root}") from None

    def keys_by_shard(self) -> dict[str, list[str]]:
        """Shard name -> its keys, in tar order."""
        out: dict[str, list[str]] = {s.name: [] for s in self.shards}
        for key, rec in self.samples.items():
            out[rec["shard"]].append(key)
        return out

    def table(self) -> pd.DataFrame:
        """The metadata as a DataFrame indexed by key: label, attribute and fold columns under the table's names,
        plus ``shard`` and ``row`` (the source row). Feed it to the group-balancing code; the balanced frame's
        index (with duplicates) is the ``keys`` argument of :func:`fastmask.data.make_loader`."""
        label = self.columns.get("label") or "label"
        fold = self.columns.get("fold")
        rows = []
        for key, rec in self.samples.items():
            row = {"key": key, label: rec["label"], **rec["attrs"], "shard": rec["shard"], "row": rec["row"]}
            if fold:
                row[fold] = rec["fold"]
            rows.append(row)
        return pd.DataFrame(rows).set_index("key")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _INDEX_FORMAT,
            "version": _INDEX_VERSION,
            "columns": self.columns,
            "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes} for s in self.shards],
            "samples": self.samples,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as JSON, atomically."""
        text = json.dumps(self.to_json(), sort_keys=False, separators=(",", ":"), ensure_ascii=True)
        atomic_write_bytes(path, text.encode("ascii"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex:
        """Load an index file, or the single ``*-index.json`` in a directory."""
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob(f"*{INDEX_SUFFIX}"))
            if len(found) != 1:
                what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
                raise FileNotFoundError(f"{path}: expected one *{INDEX_SUFFIX} file, found {what}; pass its path")
            path = found[0]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"shard index {path} cannot be read: {err}") from None
        if not isinstance(data, dict) or data.get("format") != _INDEX_FORMAT:
            raise ValueError(f"{path} is not a fastmask shard index (no \"format\": {_INDEX_FORMAT!r})")
        if data.get("version") != _INDEX_VERSION:
            raise ValueError(f"shard index {path}: version {data.get('version')!r} unsupported")
        shards = [ShardInfo(s["name"], int(s["count"]), int(s["bytes"])) for s in data["shards"]]
        return cls(root=path.parent, shards=shards, samples=data["samples"], columns=data.get("columns", {}))

    @classmethod
    def scan(cls, paths: Iterable[str | os.PathLike]) -> ShardIndex:
        """Build an index by reading local tar shards (headers and JSON members only), for shards without one.

        A shard that cannot be read to its end keeps the samples before the damage; the loader reports the rest.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("no shards given")
        roots = {p.parent.resolve() for p in paths}
        if len(roots) != 1:
            raise ValueError(f"shards must share one directory, got {sorted(map(str, roots))}")
        shards: list[ShardInfo] = []
        samples: dict[str, dict[str, Any]] = {}
        damage: list[dict[str, Any]] = []
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"shard not found: {path}")
            count = 0
            try:
                with open(path, "rb") as f:
                    for member, data in iter_tar_members(f, want=lambda name: name.endswith(".json")):
                        base = base_plus_ext(member)[0]
                        try:
                            meta = json.loads(data)
                        except ValueError as err:
                            damage.append({"shard": path.name, "key": base, "reason": "metadata", "detail": str(err)})
                            continue
                        if base in samples:
                            raise ValueError(f"key {base!r} appears in {samples[base]['shard']} and {path.name}")
                        samples[base] = {
                            "shard": path.name,
                            **{k: meta.get(k) for k in ("label", "attrs", "fold", "row", "path")},
                        }
                        count += 1
            except TarFormatError as err:
                # The samples read before the damage stay in the plan; the rest cannot be known, only reported.
                detail = f"unreadable after {count} samples: {err}"
                damage.append({"shard": path.name, "key": None, "reason": "shard", "detail": detail})
            shards.append(ShardInfo(path.name, count, path.stat().st_size))
        return cls(root=paths[0].parent, shards=shards, samples=samples, damage=damage)


class _LimitedShardWriter(wds.ShardWriter):
    """webdataset's ShardWriter starts a new shard only AFTER a shard's payload has reached ``maxsize``, so a shard
    can overshoot by a sample; this one starts it BEFORE a sample that would overshoot (unless the shard is empty)."""

    def write(self, obj: dict[str, Any]) -> None:
        nbytes = sum(len(v) for k, v in obj.items() if not k.startswith("_"))
        if self.count > 0 and self.size + nbytes > self.maxsize:
            self.next_stream()
        super().write(obj)


def _image_bytes(path: Path, where: str, column: str, verify: bool) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"column {column!r} {where}: image file not found: {path}") from None
    except OSError as err:
        raise OSError(f"column {column!r} {where}: cannot read image {path}: {err}") from None
    if verify:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"column {column!r} {where}: unreadable image {path}: {err}") from None
    return data


def write_shards(
    table: pd.DataFrame | str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_col: str = "filepath",
    label_col: str = "target",
    attr_cols: Sequence[str] | str,
    fold_col: str | None = None,
    key_col: str | None = None,
    maxcount: int = 1000,
    maxsize: int = 256 * 2**20,
    prefix: str = "shard",
    overwrite: bool = False,
    verify_images: bool = True,
) -> ShardIndex:
    """Write a metadata table and its images as WebDataset tar shards plus an index; return the index.

    Args:
        table: a DataFrame, or the path of a CSV / parquet file (read by :func:`read_table`).
        image_root: directory that relative image paths are resolved against (absolute paths are kept).
        out_dir: output directory (created); shards are ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...
            and the index is ``<prefix>-index.json``.
        image_col, label_col, attr_cols, fold_col: column names; labels must be binary, attributes and folds
            must not be NaN.
        key_col: column of unique sample keys; default: the row position zero-padded to 8 digits.
        maxcount: most samples per shard.
        maxsize: most payload bytes (image + JSON) per shard; a sample larger than this gets a shard of its own.
        prefix: shard file name prefix.
        overwrite: replace an existing shard set with this prefix (its stale shards are removed).
        verify_images: open every image with PIL (``Image.verify``) so an undecodable file fails here, naming its
            row, rather than in the middle of training.

    Everything is written to a temporary directory inside ``out_dir`` and moved into place at the end (shards
    first, the index last, each with ``os.replace``), so a failure leaves no partial shard set.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize}")
    if not re.match(r"^[A-Za-z0-9_.\-]+$", prefix):
        raise ValueError(f"prefix {prefix!r} must be a plain file name part ([A-Za-z0-9_.-])")
    source = None
    if not isinstance(table, pd.DataFrame):
        source = str(table)
        table = read_table(table)
    if isinstance(attr_cols, str):
        attr_cols = [attr_cols]
    records = check_table(
        table, image_col=image_col, label_col=label_col, attr_cols=attr_cols, fold_col=fold_col, source=source
    )
    keys = sample_keys(table, key_col)
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image_root is not a directory: {image_root}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / f"{prefix}{INDEX_SUFFIX}"
    shard_re = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    existing = sorted(p for p in out_dir.iterdir() if shard_re.match(p.name) or p == index_path)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shard set {prefix!r} ({existing[0].name}); pass overwrite=True")

    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{prefix}-tmp-"))
    try:
        samples: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        with _LimitedShardWriter(
            str(tmp / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False, **_TAR_META
        ) as writer:
            for pos, (key, rec) in enumerate(zip(keys, records, strict=True)):
                where = row_name(pos, source)
                path = image_root / rec["path"]
                ext = path.suffix.lower().lstrip(".")
                if ext not in IMAGE_EXTENSIONS:
                    raise ValueError(
                        f"column {image_col!r} {where}: {path} has extension {path.suffix!r}, "
                        f"expected one of {', '.join(IMAGE_EXTENSIONS)}"
                    )
                data = _image_bytes(path, where, image_col, verify_images)
                meta = {"key": key, **rec}
                writer.write(
                    {
                        "__key__": key,
                        ext: data,
                        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
                    }
                )
                shard = os.path.basename(writer.fname)
                counts[shard] = counts.get(shard, 0) + 1
                samples[key] = {"shard": shard, **{k: rec[k] for k in ("label", "attrs", "fold", "row", "path")}}

        shards = [ShardInfo(name, counts[name], (tmp / name).stat().st_size) for name in sorted(counts)]
        index = ShardIndex(
            root=out_dir,
            shards=shards,
            samples=samples,
            columns={"image": image_col, "label": label_col, "attrs": list(attr_cols), "fold": fold_col,
                     "key": key_col},
        )
        for s in shards:
            os.replace(tmp / s.name, out_dir / s.name)
        index.save(index_path)
        keep = {s.name for s in shards}
        for stale in existing:
            if stale.name not in keep and stale != index_path:
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index

