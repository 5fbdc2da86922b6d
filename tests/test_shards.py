"""Shard writing: round trip against Python's tarfile, determinism, limits, every error case, the tar reader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastmask.data.shards import ShardIndex, write_shards
from fastmask.data.table import read_table
from fastmask.data.tar import TarFormatError, iter_tar_members


def make_images(root: Path, n: int = 20, seed: int = 0, size: tuple[int, int] = (18, 14)) -> pd.DataFrame:
    """n small images (JPEG and PNG alternately, one grey PNG) under root, and their metadata table."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        if i % 2:
            name = f"img{i:03d}.jpg"
            Image.fromarray(arr).save(root / name, quality=95)
        elif i == 4:
            name = f"sub/img{i:03d}.png"  # a grey image in a subdirectory
            (root / "sub").mkdir(exist_ok=True)
            Image.fromarray(arr[..., 0]).save(root / name)
        else:
            name = f"img{i:03d}.png"
            Image.fromarray(arr).save(root / name)
        rows.append({"filepath": name, "target": i % 2, "sex": (i // 2) % 2, "site": i % 3, "fold": i % 5})
    return pd.DataFrame(rows)


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def tar_contents(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture
def data(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    root = tmp_path / "images"
    return make_images(root), root


def test_round_trip_against_tarfile(data, tmp_path):
    table, root = data
    index = write_shards(table, root, tmp_path / "out", attr_cols=["sex", "site"], fold_col="fold", maxcount=6)
    assert [s.count for s in index.shards] == [6, 6, 6, 2]
    members: dict[str, bytes] = {}
    where: dict[str, str] = {}
    for shard in index.shards:
        path = tmp_path / "out" / shard.name
        assert path.stat().st_size == shard.bytes
        contents = tar_contents(path)
        assert len(contents) == 2 * shard.count
        members.update(contents)
        where.update({name.split(".")[0]: shard.name for name in contents})
    assert len(index) == len(table)
    for pos, row in table.iterrows():
        key = f"{pos:08d}"
        ext = Path(row["filepath"]).suffix[1:]
        assert members[f"{key}.{ext}"] == (root / row["filepath"]).read_bytes()  # bytes unchanged
        meta = json.loads(members[f"{key}.json"])
        assert meta == {
            "key": key,
            "label": row["target"],
            "attrs": {"sex": row["sex"], "site": row["site"]},
            "fold": row["fold"],
            "row": pos,
            "path": row["filepath"],
        }
        assert index.shard_of(key) == where[key]
    # Table order is shard order: keys increase across the shards.
    order = [k for shard in index.shards for k in index.keys_by_shard()[shard.name]]
    assert order == sorted(order) == [f"{i:08d}" for i in range(len(table))]
    # The index file on disk says the same.
    loaded = ShardIndex.load(tmp_path / "out")
    assert loaded.samples == index.samples and loaded.shards == index.shards
    frame = loaded.table()
    assert list(frame.columns) == ["target", "sex", "site", "shard", "row", "fold"]
    assert frame["target"].tolist() == table["target"].tolist()
    assert frame["fold"].tolist() == table["fold"].tolist()


def test_deterministic_bytes(data, tmp_path):
    table, root = data
    a = write_shards(table, root, tmp_path / "a", attr_cols=["sex"], maxcount=8)
    b = write_shards(table, root, tmp_path / "b", attr_cols=["sex"], maxcount=8)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-index.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.shards == b.shards
    for m in tar_members(tmp_path / "a" / "shard-000000.tar"):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "fastmask", "fastmask", 0o444)


def test_user_key_column(data, tmp_path):
    table, root = data
    table = table.assign(uid=[f"case-{i}" for i in range(len(table))])
    index = write_shards(table, root, tmp_path / "o", attr_cols="sex", key_col="uid")
    assert list(index.samples) == table["uid"].tolist()
    bad = table.assign(uid=["a.b"] + table["uid"].tolist()[1:])
    with pytest.raises(ValueError, match=r"column 'uid' row 0: key 'a\.b'"):
        write_shards(bad, root, tmp_path / "o2", attr_cols="sex", key_col="uid")
    dup = table.assign(uid=["x"] * len(table))
    with pytest.raises(ValueError, match="key 'x' appears in row 0 and row 1"):
        write_shards(dup, root, tmp_path / "o3", attr_cols="sex", key_col="uid")


def test_count_and_size_limits(data, tmp_path):
    table, root = data
    index = write_shards(table, root, tmp_path / "c", attr_cols=["sex"], maxcount=7)
    assert [s.count for s in index.shards] == [7, 7, 6]

    maxsize = 3000
    index = write_shards(table, root, tmp_path / "s", attr_cols=["sex"], maxsize=maxsize)
    assert len(index.shards) > 1
    sizes = []
    for shard in index.shards:
        with tarfile.open(tmp_path / "s" / shard.name) as tar:
            members = tar.getmembers()
        total = sum(m.size for m in members)
        sizes.append(total)
        # Never above the limit, unless one sample alone is larger (then it sits alone).
        assert total <= maxsize or len(members) == 2
    # And not split needlessly: each shard plus the next shard's first sample would exceed the limit.
    for nxt, total in zip(index.shards[1:], sizes, strict=False):
        with tarfile.open(tmp_path / "s" / nxt.name) as tar:
            first = tar.getmembers()[:2]
        assert total + sum(m.size for m in first) > maxsize


def test_one_sample_larger_than_maxsize_sits_alone(data, tmp_path):
    table, root = data
    index = write_shards(table.iloc[:3], root, tmp_path / "o", attr_cols=["sex"], maxsize=10)
    assert [s.count for s in index.shards] == [1, 1, 1]


def test_read_table_csv_and_parquet(data, tmp_path):
    table, root = data
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_parquet(tmp_path / "t.parquet", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.csv"), table)
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet"), table)
    a = write_shards(tmp_path / "t.csv", root, tmp_path / "a", attr_cols=["sex"])
    b = write_shards(tmp_path / "t.parquet", root, tmp_path / "b", attr_cols=["sex"])
    assert a.samples == b.samples
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown format"):
        read_table(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="metadata table not found"):
        read_table(tmp_path / "nope.csv")


def _write_bad(table: pd.DataFrame, root: Path, out: Path, **kw):
    kw.setdefault("attr_cols", ["sex"])
    return write_shards(table, root, out, **kw)


@pytest.mark.parametrize(
    "change, kwargs, error, pattern",
    [
        (lambda t: t.drop(columns="target"), {}, ValueError, r"missing column\(s\) label_col='target'"),
        (lambda t: t, {"attr_cols": ["sex", "age"]}, ValueError, r"attr_cols\[1\]='age'"),
        (lambda t: t.drop(columns="filepath"), {}, ValueError, r"image_col='filepath'"),
        (lambda t: t, {"fold_col": "split"}, ValueError, r"fold_col='split'"),
        (lambda t: t, {"attr_cols": []}, ValueError, "at least one attribute column"),
        (lambda t: t.iloc[:0], {}, ValueError, "no rows"),
        (lambda t: t.assign(target=[0, 1, 2] + [0] * (len(t) - 3)), {}, ValueError,
         r"column 'target' row 2: label 2 is not binary"),
        (lambda t: t.assign(target=[0.5] + [0.0] * (len(t) - 1)), {}, ValueError,
         r"column 'target' row 0: label 0.5 is not binary"),
        (lambda t: t.assign(target=["yes"] + [0] * (len(t) - 1)), {}, ValueError,
         r"column 'target' row 0: label 'yes' is not binary"),
        (lambda t: t.assign(target=[0.0, np.nan] + [1.0] * (len(t) - 2)), {}, ValueError,
         r"column 'target' row 1: label is NaN"),
        (lambda t: t.assign(sex=[0, 1, 0, np.nan] + [1.0] * (len(t) - 4)), {}, ValueError,
         r"column 'sex' row 3: attribute value is NaN"),
        (lambda t: t.assign(fold=[np.nan] + [1.0] * (len(t) - 1)), {"fold_col": "fold"}, ValueError,
         r"column 'fold' row 0: fold is NaN"),
        (lambda t: t.assign(filepath=["missing.jpg"] + t["filepath"].tolist()[1:]), {}, FileNotFoundError,
         r"column 'filepath' row 0: image file not found: .*missing\.jpg"),
        (lambda t: t.assign(filepath=[None] + t["filepath"].tolist()[1:]), {}, ValueError,
         r"column 'filepath' row 0: image path is missing"),
        (lambda t: t.assign(filepath=[3] + t["filepath"].tolist()[1:]), {}, ValueError,
         r"column 'filepath' row 0: image path 3 is not a string"),
        (lambda t: t.assign(filepath=["notes.txt"] + t["filepath"].tolist()[1:]), {}, ValueError,
         r"row 0: .*notes\.txt has extension '\.txt'"),
        (lambda t: t, {"maxcount": 0}, ValueError, "maxcount must be >= 1"),
        (lambda t: t, {"prefix": "a/b"}, ValueError, "prefix"),
    ],
)
def test_errors_name_row_and_column(data, tmp_path, change, kwargs, error, pattern):
    table, root = data
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(error, match=pattern):
        _write_bad(change(table), root, tmp_path / "out", **kwargs)
    # Nothing half-written is left behind.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unreadable_image_names_row_and_path(data, tmp_path):
    table, root = data
    (root / "img005.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(ValueError, match=r"column 'filepath' row 5: unreadable image .*img005\.jpg"):
        write_shards(table, root, tmp_path / "out", attr_cols=["sex"], maxcount=2)
    # Shards of rows 0-4 were written to a temporary directory, which is gone.
    assert not any((tmp_path / "out").iterdir())


def test_csv_error_names_line(data, tmp_path):
    table, root = data
    table.loc[3, "target"] = 7
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"row 3 \(line 5 of .*t\.csv\): label 7 is not binary"):
        write_shards(tmp_path / "t.csv", root, tmp_path / "out", attr_cols=["sex"])


def test_existing_shards_need_overwrite(data, tmp_path):
    table, root = data
    write_shards(table, root, tmp_path / "o", attr_cols=["sex"], maxcount=5)
    assert len(list((tmp_path / "o").glob("shard-*.tar"))) == 4
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(table, root, tmp_path / "o", attr_cols=["sex"])
    index = write_shards(table, root, tmp_path / "o", attr_cols=["sex"], maxcount=10, overwrite=True)
    # The stale shards 2 and 3 of the first set are gone; the index lists exactly what is on disk.
    assert sorted(p.name for p in (tmp_path / "o").glob("shard-*.tar")) == [s.name for s in index.shards]
    assert len(index.shards) == 2


def test_scan_matches_index(data, tmp_path):
    table, root = data
    index = write_shards(table, root, tmp_path / "o", attr_cols=["sex", "site"], maxcount=6)
    scanned = ShardIndex.scan(index.urls)
    assert scanned.samples == index.samples
    assert scanned.shards == index.shards
    assert scanned.attr_cols == ["sex", "site"] and not scanned.damage


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: skipped
        v7 = tarfile.TarInfo("v7dir/")
        v7.type = tarfile.AREGTYPE
        tar.addfile(v7)  # a V7-style directory entry: skipped too
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt):
    long = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    members = [("a.jpg", b"x" * 513), ("a.json", b"{}"), (f"{long}/b.png", b""), ("c.json", bytes(range(256)) * 3)]
    raw = _tar_bytes(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert list(iter_tar_members(io.BytesIO(raw))) == expected == members
    assert list(iter_tar_members(io.BytesIO(raw), want=lambda n: n.endswith(".json"))) == [members[1], members[3]]


def test_tar_reader_damage():
    raw = _tar_bytes([("a.jpg", b"x" * 1000), ("b.jpg", b"y" * 1000)], tarfile.USTAR_FORMAT)
    with pytest.raises(TarFormatError, match="ends inside member b.jpg"):
        list(iter_tar_members(io.BytesIO(raw[: 512 * 5 + 100])))
    # Also when the damaged member is skipped by seeking.
    with pytest.raises(TarFormatError, match="ends inside member b.jpg"):
        list(iter_tar_members(io.BytesIO(raw[: 512 * 5 + 100]), want=lambda n: False))
    with pytest.raises(TarFormatError, match="without the end-of-archive blocks"):
        list(iter_tar_members(io.BytesIO(raw[: 512 * 6])))
    bad = bytearray(raw)
    bad[512 * 3] ^= 0xFF  # first byte of b.jpg's header name
    with pytest.raises(TarFormatError, match="damaged header after member a.jpg"):
        list(iter_tar_members(io.BytesIO(bytes(bad))))
