"""The streaming loader and the map-style dataset: contents against an independent decode, determinism, ranks,
workers, keys with counts, damage skipped and counted, strict mode, attribute handling; the transforms."""

from __future__ import annotations

import io
import logging
import multiprocessing
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_shards import make_images

from fastmask.data.image_table import ImageTableDataset
from fastmask.data.loader import make_loader
from fastmask.data.shards import ShardIndex, write_shards
from fastmask.data.stats import ShardReadError
from fastmask.data.transforms import ImageTransform, augment, decode_image, normalize_batch

SIZE = 8
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def oracle(path: Path, size: int = SIZE) -> np.ndarray:
    """Independent reference: PIL full decode, RGB, bilinear resize, numpy normalisation, CHW float64."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64)
    return ((arr / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def the_8_variants(chw: np.ndarray) -> list[np.ndarray]:
    """Every combination of horizontal flip, vertical flip and transpose of a CHW image."""
    out = []
    for h in (False, True):
        for v in (False, True):
            for t in (False, True):
                x = chw
                x = x[:, :, ::-1] if h else x
                x = x[:, ::-1, :] if v else x
                x = x.transpose(0, 2, 1) if t else x
                out.append(x)
    return out


@pytest.fixture
def shards(tmp_path: Path):
    """24 images (JPEG / PNG / one grey PNG) in 4 shards of 6; returns (table, image root, shard dir)."""
    root = tmp_path / "images"
    table = make_images(root, n=24)
    write_shards(table, root, tmp_path / "shards", attr_cols=["sex", "site"], fold_col="fold", maxcount=6)
    return table, root, tmp_path / "shards"


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[int]]:
    xs, ys, as_, keys, sizes = [], [], [], [], []
    for batch in loader:
        x, y, a, k = batch
        assert x.dtype == torch.float32 and y.dtype == torch.float32 and a.dtype == torch.int64
        assert x.shape[1:] == (3, SIZE, SIZE) and x.shape[0] == y.shape[0] == a.shape[0] == len(k)
        assert x.is_contiguous()
        xs.append(x)
        ys.append(y)
        as_.append(a)
        keys += k
        sizes.append(len(k))
    return torch.cat(xs), torch.cat(ys), torch.cat(as_), keys, sizes


def key_of(pos: int) -> str:
    return f"{pos:08d}"


def test_round_trip_eval(shards):
    table, root, out = shards
    loader = make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", return_keys=True)
    x, y, a, keys, sizes = collect(loader)
    assert sizes == [5, 5, 5, 5, 4] and len(loader) == 5
    assert keys == [key_of(i) for i in range(len(table))]  # no shuffling in evaluation: table order
    for i, row in table.iterrows():
        np.testing.assert_allclose(x[i].numpy(), oracle(root / row["filepath"]), rtol=0, atol=2e-5)
        assert y[i].item() == row["target"] and a[i].item() == row["sex"]
    assert loader.stats.samples == 24 and loader.stats.skipped == 0 and loader.stats.batches == 5


def test_train_mode_shuffles_and_augments_with_the_papers_flips(shards):
    table, root, out = shards
    loader = make_loader(out, batch_size=4, train=True, image_size=SIZE, attr="site", return_keys=True, seed=3)
    x, y, a, keys, sizes = collect(loader)
    assert sizes == [4] * 6 and sorted(keys) == [key_of(i) for i in range(24)]
    assert keys != sorted(keys)
    used = Counter()
    for xi, yi, ai, key in zip(x, y, a, keys, strict=True):
        row = table.iloc[int(key)]
        assert yi.item() == row["target"] and ai.item() == row["site"]
        ref = oracle(root / row["filepath"])
        matches = [j for j, v in enumerate(the_8_variants(ref)) if np.allclose(xi.numpy(), v, atol=2e-5)]
        assert matches, f"key {key}: not a flip / transpose of the image"
        used[matches[0]] += 1
    assert len(used) > 1  # (1/8)^24 chance of all-identity otherwise


def test_same_seed_same_batches_other_seed_or_epoch_differs(shards):
    _, _, out = shards

    def run(seed, epoch=None, workers=0):
        loader = make_loader(out, batch_size=4, train=True, image_size=SIZE, attr="sex", seed=seed,
                             return_keys=True, workers=workers, shuffle_buffer=5)
        if epoch is not None:
            loader.set_epoch(epoch)
        return collect(loader)

    a, b = run(0), run(0)
    assert a[3] == b[3] and torch.equal(a[0], b[0])
    assert run(1)[3] != a[3]
    assert run(0, epoch=1)[3] != a[3]
    # Epochs advance by themselves, and set_epoch pins one.
    loader = make_loader(out, batch_size=4, train=True, image_size=SIZE, attr="sex", return_keys=True, shuffle_buffer=5)
    first, second = collect(loader)[3], collect(loader)[3]
    assert first == a[3] and second != first and loader.epoch == 2
    loader.set_epoch(0)
    assert collect(loader)[3] == first
    w1, w2 = run(0, workers=2), run(0, workers=2)
    assert w1[3] == w2[3] and torch.equal(w1[0], w2[0]) and sorted(w1[3]) == sorted(a[3])


def test_shuffled_test_transform_pass_for_the_importance(shards):
    # Spec §1: the importance pass reads D_e once, shuffled, with test transforms.
    table, root, out = shards
    loader = make_loader(out, batch_size=5, train=False, shuffle=True, image_size=SIZE, attr="sex",
                         shuffle_buffer=8, return_keys=True)
    x, _, _, keys, sizes = collect(loader)
    assert sizes == [5, 5, 5, 5, 4] and sorted(keys) == [key_of(i) for i in range(24)] and keys != sorted(keys)
    for xi, key in zip(x, keys, strict=True):
        np.testing.assert_allclose(xi.numpy(), oracle(root / table.iloc[int(key)]["filepath"]), atol=2e-5)


def test_fewer_samples_than_a_batch_fill_one_batch_when_training(shards):
    _, _, out = shards
    keys = [key_of(3), key_of(9), key_of(20)]
    loader = make_loader(out, batch_size=5, train=True, image_size=SIZE, attr="sex", keys=keys, return_keys=True)
    _, _, _, got, sizes = collect(loader)
    assert sizes == [5] and set(got) == set(keys) and loader.stats.passes == 2


def test_keys_mapping_counts(shards):
    table, _, out = shards
    counts = {key_of(0): 3, key_of(1): 0, key_of(5): 1, key_of(17): 2, key_of(23): 1}
    loader = make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys=counts, return_keys=True)
    x, y, a, keys, _ = collect(loader)
    assert Counter(keys) == Counter({k: c for k, c in counts.items() if c})
    assert y.tolist() == [table.iloc[int(key)]["target"] for key in keys]
    # Repeats of one key are the same image in evaluation.
    first = [i for i, k in enumerate(keys) if k == key_of(0)]
    assert all(torch.equal(x[first[0]], x[i]) for i in first)
    # An iterable of keys with repeats (a balanced DataFrame's index) means the same; a pandas Series too.
    listed = [key_of(0)] * 3 + [key_of(5), key_of(17), key_of(17), key_of(23)]
    again = make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys=listed, return_keys=True)
    assert Counter(collect(again)[3]) == Counter(listed)
    for series in (pd.Series(counts), pd.Series(listed).value_counts(), pd.Series(listed, name="source_index")):
        third = make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys=series,
                            return_keys=True)
        assert Counter(collect(third)[3]) == Counter(listed)
    with pytest.raises(KeyError, match="not in the shard index.*'nope'"):
        make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys={"nope": 1})
    with pytest.raises(ValueError, match=r"keys\['00000000'\]: count -1"):
        make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys={key_of(0): -1})
    with pytest.raises(ValueError, match="no samples selected"):
        make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", keys={key_of(0): 0})


def test_group_balanced_set_from_the_index(shards):
    # The wiring the pipeline uses: balance the index's table, stream the balanced rows by key.
    from fastmask.data.balance import group_balance

    table, _, out = shards
    index = ShardIndex.load(out)
    balanced = group_balance(index.table(), "site", "target", replace=True, seed=0)
    loader = make_loader(index, batch_size=4, train=True, image_size=SIZE, attr="site",
                         keys=balanced["source_index"], return_keys=True, drop_last=False)
    _, y, a, keys, _ = collect(loader)
    assert Counter(keys) == Counter(balanced["source_index"].tolist())
    assert sorted(zip(keys, y.tolist(), a.tolist(), strict=True)) == sorted(
        (k, float(table.iloc[int(k)]["target"]), int(table.iloc[int(k)]["site"])) for k in keys
    )


@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_disjoint_and_equal_batches(shards, train):
    _, _, out = shards
    runs = [
        collect(make_loader(out, batch_size=5, train=train, image_size=SIZE, attr="sex", rank=r, world_size=2,
                            return_keys=True))
        for r in (0, 1)
    ]
    k0, k1 = runs[0][3], runs[1][3]
    assert not set(k0) & set(k1)
    assert runs[0][4] == runs[1][4] == ([5, 5] if train else [5, 5, 2])
    if not train:
        assert sorted(k0 + k1) == [key_of(i) for i in range(24)]


def test_two_ranks_odd_count_pad_like_distributed_sampler(shards):
    _, _, out = shards
    keys = [key_of(i) for i in range(7)]
    runs = [
        collect(make_loader(out, batch_size=3, train=False, image_size=SIZE, attr="sex", rank=r, world_size=2,
                            keys=keys, return_keys=True))
        for r in (0, 1)
    ]
    assert runs[0][4] == runs[1][4] == [3, 1]
    union = Counter(runs[0][3] + runs[1][3])
    assert set(union) == set(keys) and sum(union.values()) == 8  # one sample repeated, as DistributedSampler pads


def test_epoch_length_resamples_to_a_fixed_count(shards):
    _, _, out = shards
    runs = []
    for rank in (0, 1):
        loader = make_loader(out, batch_size=5, train=True, image_size=SIZE, attr="sex", epoch_length=7,
                             rank=rank, world_size=2, return_keys=True)
        runs.append(collect(loader)[3:])
        assert runs[-1][1] == [5] * 7 and len(loader) == 7
        assert loader.stats.passes == 3  # 12 samples per rank per pass: 12 + 12 + 11
    for keys, _ in runs:
        passes = [keys[:12], keys[12:24], keys[24:]]
        assert [len(set(p)) for p in passes] == [12, 12, 11]  # no repeat within a pass
    for p in (slice(0, 12), slice(12, 24)):  # in each pass the two ranks split the data
        assert sorted(runs[0][0][p] + runs[1][0][p]) == [key_of(i) for i in range(24)]


@pytest.mark.parametrize("maxcount", [6, 24])  # 4 shards, and a single shard for two workers
def test_two_workers(tmp_path, maxcount):
    root = tmp_path / "images"
    table = make_images(root, n=24)
    write_shards(table, root, tmp_path / "s", attr_cols=["sex"], maxcount=maxcount)
    loader = make_loader(tmp_path / "s", batch_size=5, train=False, image_size=SIZE, workers=2, return_keys=True)
    x, y, a, keys, sizes = collect(loader)
    assert sorted(keys) == [key_of(i) for i in range(24)] and sum(sizes) == 24
    for xi, key in zip(x, keys, strict=True):
        np.testing.assert_allclose(xi.numpy(), oracle(root / table.iloc[int(key)]["filepath"]), atol=2e-5)
    train = make_loader(tmp_path / "s", batch_size=5, train=True, image_size=SIZE, workers=2, return_keys=True)
    assert collect(train)[4] == [5] * 4


def test_stopping_early_stops_the_workers(shards):
    _, _, out = shards
    loader = make_loader(out, batch_size=5, train=True, image_size=SIZE, attr="sex", workers=2)
    for _ in loader:
        break
    assert multiprocessing.active_children() == []
    assert len(list(loader)) == len(loader) == 4


def rewrite_member(shard: Path, member: str, data: bytes) -> None:
    """Replace one member's bytes in a tar (the other members and their order unchanged)."""
    with tarfile.open(shard) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in items:
            payload = data if info.name == member else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("damage", ["garbage", "truncated-jpeg", "bad-json", "no-json"])
def test_corrupted_member_is_skipped_and_counted(shards, damage, caplog):
    table, root, out = shards
    shard = out / "shard-000001.tar"  # keys 6..11; key 7 is a JPEG
    jpeg = (root / table.iloc[7]["filepath"]).read_bytes()
    if damage == "garbage":
        rewrite_member(shard, "00000007.jpg", b"\x00garbage" * 50)
    elif damage == "truncated-jpeg":
        rewrite_member(shard, "00000007.jpg", jpeg[: len(jpeg) // 2])
    elif damage == "bad-json":
        rewrite_member(shard, "00000007.json", b"{not json")
    else:
        with tarfile.open(shard) as tar:
            items = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "00000007.json"]
        with tarfile.open(shard, "w") as tar:
            for info, payload in items:
                tar.addfile(info, io.BytesIO(payload))
    caplog.set_level(logging.INFO, logger="fastmask.data")
    loader = make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", return_keys=True)
    _, _, _, keys, sizes = collect(loader)
    assert sorted(keys) == [key_of(i) for i in range(24) if i != 7]
    reason = {"garbage": "decode", "truncated-jpeg": "decode", "bad-json": "metadata", "no-json": "incomplete"}[damage]
    stats = loader.stats
    assert stats.skipped == 1 and stats.by_reason() == {reason: 1} and stats.samples == 23
    assert (stats.records[0].shard, stats.records[0].key) == ("shard-000001.tar", "00000007")
    assert any("skipped 1" in r.getMessage() and "00000007" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(ShardReadError, match=rf"shard shard-000001.tar key 00000007: {reason}"):
        collect(make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", strict=True,
                            return_keys=True))


def test_truncated_shard_is_skipped_and_counted(shards):
    table, _, out = shards
    shard = out / "shard-000002.tar"  # keys 12..17
    raw = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[5].offset_data + 10  # inside 00000014's second member
    shard.write_bytes(raw[:cut])
    loader = make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", return_keys=True)
    _, _, _, keys, _ = collect(loader)
    lost = {key_of(i) for i in (14, 15, 16, 17)}
    assert sorted(keys) == sorted({key_of(i) for i in range(24)} - lost)
    (record,) = loader.stats.records
    assert (record.reason, record.shard, record.key, record.samples) == ("shard", "shard-000002.tar", "00000014", 4)
    assert "truncated" in record.detail
    assert loader.stats.skipped == 4
    with pytest.raises(ShardReadError, match="shard shard-000002.tar key 00000014: shard: .*truncated"):
        collect(make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", strict=True,
                            return_keys=True))


def test_missing_shard_file_and_strict_in_workers(shards):
    _, _, out = shards
    (out / "shard-000003.tar").unlink()
    loader = make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", workers=2, return_keys=True)
    _, _, _, keys, _ = collect(loader)
    assert sorted(keys) == [key_of(i) for i in range(18)]
    (record,) = loader.stats.records
    assert (record.reason, record.shard, record.key, record.samples) == ("shard", "shard-000003.tar", "00000018", 6)
    with pytest.raises(ShardReadError, match="shard shard-000003.tar key 00000018"):
        collect(make_loader(out, batch_size=5, train=False, image_size=SIZE, attr="sex", workers=2, strict=True,
                            return_keys=True))


def test_ranks_keep_equal_batches_despite_damage(shards):
    _, _, out = shards
    rewrite_member(out / "shard-000000.tar", "00000002.png", b"garbage")
    for train in (False, True):
        sizes = [
            collect(make_loader(out, batch_size=5, train=train, image_size=SIZE, attr="sex", rank=r, world_size=2,
                                return_keys=True))[4]
            for r in (0, 1)
        ]
        assert sizes[0] == sizes[1] == ([5, 5] if train else [5, 5, 2])


def test_index_less_shards_are_scanned(shards):
    table, _, out = shards
    (out / "shard-index.json").unlink()
    urls = sorted(str(p) for p in out.glob("*.tar"))
    for source in (out, urls, str(out / "shard-{000000..000003}.tar")):
        loader = make_loader(source, batch_size=24, train=False, image_size=SIZE, attr="site", return_keys=True)
        _, y, a, keys, _ = collect(loader)
        assert keys == [key_of(i) for i in range(24)]
        assert a.tolist() == table["site"].tolist() and y.tolist() == table["target"].tolist()
    # A truncated shard found while scanning is reported by the loader.
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    loader = make_loader(out, batch_size=24, train=False, image_size=SIZE, attr="site", return_keys=True)
    _, _, _, keys, _ = collect(loader)
    assert len(keys) < 24 and [r.shard for r in loader.stats.records] == ["shard-000001.tar"]
    assert ShardIndex.scan(urls).damage[0]["reason"] == "shard"


def test_attribute_choice_and_mapping(tmp_path):
    root = tmp_path / "images"
    table = make_images(root, n=6)
    table["sex"] = ["F", "M", "F", "M", "F", "M"]
    write_shards(table, root, tmp_path / "s", attr_cols=["sex", "site"])
    with pytest.raises(ValueError, match=r"attr: the shards have attributes \['sex', 'site'\]; choose one"):
        make_loader(tmp_path / "s", batch_size=2, train=False, image_size=SIZE)
    with pytest.raises(ValueError, match=r"attr 'age' is not an attribute of the shards"):
        make_loader(tmp_path / "s", batch_size=2, train=False, image_size=SIZE, attr="age")
    with pytest.raises(ValueError, match=r"key 00000000 \(row 0.*attribute 'sex' value 'F' is not an integer"):
        make_loader(tmp_path / "s", batch_size=2, train=False, image_size=SIZE, attr="sex")
    with pytest.raises(ValueError, match=r"key 00000001 \(row 1.*value 'M' is not in attr_map"):
        make_loader(tmp_path / "s", batch_size=2, train=False, image_size=SIZE, attr="sex", attr_map={"F": 0})
    loader = make_loader(tmp_path / "s", batch_size=6, train=False, image_size=SIZE, attr="sex",
                         attr_map={"F": 1, "M": 0})
    (_, _, a), = list(loader)
    assert a.tolist() == [1, 0, 1, 0, 1, 0]


def test_argument_errors(shards):
    _, _, out = shards
    for kwargs, pattern in [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"epoch_length": 0}, "epoch_length must be >= 1"),
        ({"rank": 2, "world_size": 2}, "rank 2 / world_size 2"),
    ]:
        args = {"batch_size": 2, "train": False, "image_size": SIZE, "attr": "sex", **kwargs}
        with pytest.raises(ValueError, match=pattern):
            make_loader(out, **args)
    with pytest.raises(FileNotFoundError, match="no shard index and no .tar shards"):
        make_loader(out / "..", batch_size=2, train=False, image_size=SIZE)


def test_image_table_dataset_same_triple(shards):
    table, root, out = shards
    ds = ImageTableDataset(table, root, image_size=SIZE, attr="sex", return_keys=True)
    x, y, a, key = ds[3]
    assert x.shape == (3, SIZE, SIZE) and y.dtype == torch.float32 and a.dtype == torch.int64 and key == key_of(3)
    np.testing.assert_allclose(x.numpy(), oracle(root / table.iloc[3]["filepath"]), atol=2e-5)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=24, num_workers=2))
    stream = list(make_loader(out, batch_size=24, train=False, image_size=SIZE, attr="sex", return_keys=True))
    for got, want in zip(batches[0], stream[0], strict=True):
        assert list(got) == want if isinstance(want, list) else torch.equal(got, want)
    # Training draws depend on (seed, epoch, item), not on the worker.
    train = ImageTableDataset(table, root, image_size=SIZE, attr="sex", train=True, seed=1)
    assert torch.equal(train[5][0], train[5][0])
    assert any(not torch.equal(train[i][0], ds[i][0]) for i in range(24))
    (root / table.iloc[2]["filepath"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"row 2: image file not found: .*img002\.png"):
        ds[2]


def test_transforms_against_numpy():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    always = np.random.default_rng(1)
    np.testing.assert_array_equal(augment(img, always, 1.0, 0.0, 0.0), img[:, ::-1])
    np.testing.assert_array_equal(augment(img, always, 0.0, 1.0, 0.0), img[::-1])
    np.testing.assert_array_equal(augment(img, always, 0.0, 0.0, 1.0), img.transpose(1, 0, 2))
    np.testing.assert_array_equal(augment(img, always, 1.0, 1.0, 1.0), img[::-1, ::-1].transpose(1, 0, 2))
    np.testing.assert_array_equal(augment(img, always, 0.0, 0.0, 0.0), img)
    x = normalize_batch([img, img[::-1]])
    ref = (img.astype(np.float64) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), ref[::-1].transpose(2, 0, 1), atol=1e-6)
    shared = normalize_batch([img, img[::-1]], shared=True)
    assert shared.is_shared() and not x.is_shared() and torch.equal(shared, x)
    # Centre crop of the original image, then resize.
    big = Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    got = decode_image(buf.getvalue(), 10, center_crop=20)
    want = np.asarray(big.crop((10, 5, 30, 25)).resize((10, 10), Image.BILINEAR))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="hflip probability"):
        ImageTransform(8, hflip=1.5)
    with pytest.raises(ValueError, match="needs rng"):
        ImageTransform(8, train=True).image(buf.getvalue())
